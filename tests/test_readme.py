"""README.md cannot drift from the CLI: every `fedsov` command in it parses with the real parser, the
fast ones run as printed, and its Python snippets use no undefined name."""

from __future__ import annotations

import ast
import builtins
import glob
import re
import shlex
from pathlib import Path

import pytest

from common.cli import build_parser, main
from common.data.records import write_jsonl
from common.data.synthetic import REGION_LOCALES, generate_region_records
from tests.test_cli_errors import tokenizer_model  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Placeholders the parser checks the type of.
PLACEHOLDERS = {"<flower-run-id>": "7"}


def bash_commands() -> list[list[str]]:
    """The arguments of each `.venv/bin/fedsov` command in the bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == [".venv/bin/fedsov"]:
                    commands.append([PLACEHOLDERS.get(w, w) for w in words[1:]])
    return commands


def inline_commands() -> list[str]:
    """`fedsov ...` and `.venv/bin/fedsov ...` in the prose (which may wrap over a line break)."""
    return [" ".join(m.split()) for m in re.findall(r"`((?:\.venv/bin/)?fedsov [^`]+)`", README)]


def parses(argv: list[str]) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit as done:
        return done.code == 0  # --help
    return True


def test_readme_has_the_commands_this_test_runs():
    commands = bash_commands()
    assert len(commands) >= 20
    for prefix in (
        ["policy", "validate"],
        ["policy", "explain"],
        ["policy", "dry-run"],
        ["audit", "verify"],
        ["data", "check"],
        ["node", "start"],
        ["deploy", "local"],
        ["simulate"],
    ):
        assert any(c[: len(prefix)] == prefix for c in commands), prefix


@pytest.mark.parametrize("argv", bash_commands(), ids=lambda argv: " ".join(argv)[:60])
def test_each_readme_command_parses(argv, capsys):
    assert parses(argv), capsys.readouterr().err


def test_each_inline_command_names_a_real_command(capsys):
    for text in inline_commands():
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(text)[1:]]
        if text.startswith(".venv/bin/fedsov"):
            assert parses(words), (text, capsys.readouterr().err)
        else:  # a mention such as `fedsov node start`: the command exists, its arguments may be elided
            command = [w for w in words if not w.startswith(("-", "<")) and "=" not in w][:2]
            assert parses([*command, "--help"]), (text, capsys.readouterr().err)


def test_fast_readme_commands_run_as_printed(tmp_path, config_dir, tokenizer_model, monkeypatch, capsys):  # noqa: F811
    """policy, audit verify and data check, each exactly as printed (data check: on test data and a small model)."""
    from common.audit import AuditLog, EvidenceKey, HashChainLog

    work = tmp_path / "fedsov-work"
    node_key = EvidenceKey.load_or_create(work / "keys" / "eu-1")
    AuditLog(work / "nodes" / "eu-1" / "audit.jsonl", "node:eu-1", node_key).record(
        "start", "accepted", reason="README"
    )
    ledger_key = EvidenceKey.load_or_create(work / "keys" / "ledger-eu")
    HashChainLog(work / "ledgers" / "eu" / "privacy-ledger.jsonl", ledger_key).append({"event": "README check"})
    data = tmp_path / "data" / "eu"
    write_jsonl(generate_region_records("eu", REGION_LOCALES["eu"], seed=1, num_users=20), data / "part-0.jsonl")
    ran = []
    for argv in bash_commands():
        if argv[:1] == ["policy"]:
            monkeypatch.chdir(REPO)  # its paths are the checkout's
            argv = [path for word in argv for path in (sorted(glob.glob(word)) if "*" in word else [word])]
        elif argv[:2] == ["audit", "verify"]:
            monkeypatch.chdir(tmp_path)
        elif argv[:2] == ["data", "check"]:
            monkeypatch.chdir(tmp_path)
            argv = [str(data) if word == "/data/eu" else word for word in argv] + ["--model-path", str(tokenizer_model)]
        else:
            continue
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0 and "Traceback" not in out + err, (argv, out[-2000:], err[-2000:])
        ran.append(argv[:2])
    assert {tuple(a) for a in ran} >= {
        ("policy", "validate"),
        ("policy", "explain"),
        ("policy", "dry-run"),
        ("audit", "verify"),
        ("data", "check"),
    }


def test_python_snippets_use_only_names_they_define():
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        tree = ast.parse(block)
        defined = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= defined, (sorted(used - defined), block)


def test_setup_gives_uv_the_package_sources_pip_is_configured_with():
    """scripts/setup.sh installs with uv, which does not read pip's configuration: every source pip would use
    is passed on, and a setting that cannot be carried over sends setup back to pip."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from uv_args import uv_args

    pip_config = "\n".join(
        [
            ":env:.default-timeout='180'",
            ":env:.find-links='/opt/wheels'",
            "global.cert='/etc/ssl/certs/ca.crt'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
            "global.index-url='https://mirror.example/simple'",
            "user.index-url='https://inner.example/simple'",
        ]
    )
    args, env = uv_args(pip_config)
    assert args == [
        "--index-strategy",
        "unsafe-best-match",  # pip's rule: the best version from any source
        "--find-links",
        "/opt/wheels",
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
        "--extra-index-url",
        "file:///opt/a/simple",
        "--extra-index-url",
        "file:///opt/b/simple",
        "--index-url",
        "https://inner.example/simple",  # pip lists its files in precedence order: the last one wins
    ]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca.crt"}
    assert uv_args("") == (["--index-strategy", "unsafe-best-match"], {})
    # Sources uv would not see the same way: setup installs with pip.
    assert uv_args("global.trusted-host='pypi.internal'") is None
    assert uv_args("global.proxy='http://proxy:3128'") is None
    assert uv_args("global.no-index='true'") is None
