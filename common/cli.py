"""The `fedsov` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.errors import FedsovError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedsov",
        description="Federated DP-LoRA fine-tuning across jurisdictions. Settings are Hydra "
        "overrides, e.g. `fedsov simulate federation.rounds=3 regions=[eu,us]`.",
    )
    parser.add_argument("--config-dir", type=Path, default=None, help="fedsov's configs/ folder (default: the bundled one)")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a simulated federation on this machine (Flower + Ray)")
    sim.add_argument("overrides", nargs="*", help="config overrides key=value; resume=<run_dir> continues a run")
    args = parser.parse_args(argv)

    # Nothing fedsov runs may fetch models or data sets.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if args.command == "simulate":
            from server.simulation import simulate

            return simulate(args.overrides, args.config_dir)
    except FedsovError as err:
        print(f"fedsov: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsov: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
