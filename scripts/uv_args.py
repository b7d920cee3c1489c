"""Print, one per line, the `uv pip install` options that give uv the package sources pip is configured with.

scripts/setup.sh installs with uv (seconds, where pip takes one to two minutes), but uv does not read pip's
configuration: the indexes, wheel folders and constraints a machine's pip.conf or PIP_* variables name would
be missed. This reads them as pip reports them (`pip config list`). A setting it cannot carry over exits 1,
and setup.sh installs with pip as before: never an install from other sources than pip would use.

    python scripts/uv_args.py "$(python -m pip config list)"
"""

from __future__ import annotations

import ast
import sys

# pip's name -> uv's option; the values of the "many" ones are space-separated lists in pip's configuration.
ONE = {"index-url": "--index-url", "constraint": "--constraint"}
MANY = {"extra-index-url": "--extra-index-url", "find-links": "--find-links"}
# Settings of pip's own output and patience: nothing about where packages come from.
HARMLESS = {"default-timeout", "timeout", "disable-pip-version-check", "progress-bar", "no-color", "quiet", "verbose"}


def uv_args(pip_config: str) -> tuple[list[str], dict[str, str]] | None:
    """uv's options and environment for pip's configuration, or None where a setting has no faithful match."""
    options: dict[str, list[str]] = {}
    env: dict[str, str] = {}
    for line in pip_config.splitlines():
        if not line.strip():
            continue
        name, _, raw = line.partition("=")
        key, value = name.rsplit(".", 1)[-1], str(ast.literal_eval(raw))
        if key in ONE:
            options[ONE[key]] = [value]  # later lines (pip's environment variables) win, as in pip
        elif key in MANY:
            options[MANY[key]] = value.split()
        elif key == "cert":
            env["SSL_CERT_FILE"] = value  # uv trusts the certificates named here, as pip does
        elif key not in HARMLESS:
            return None
    args = [a for option, values in options.items() for v in values for a in (option, v)]
    # pip takes the best version from all its sources; uv by default stops at the first index that has a name.
    return ["--index-strategy", "unsafe-best-match", *args], env


def main() -> int:
    found = uv_args(sys.argv[1] if len(sys.argv) > 1 else "")
    if found is None:
        return 1
    args, env = found
    print("\n".join(args))
    for key, value in env.items():
        print(f"ENV {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
