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

    policy = sub.add_parser("policy", help="region policies: validate, explain, dry-run a round plan")
    psub = policy.add_subparsers(dest="action", required=True)
    validate = psub.add_parser("validate", help="check region policy files against the schema")
    validate.add_argument("files", nargs="+", type=Path)
    explain = psub.add_parser("explain", help="a policy in plain words")
    explain.add_argument("region", help="a region name (configs/regions/<name>.yaml) or a policy file")
    dry = psub.add_parser("dry-run", help="check the round plan against every region's policy")
    dry.add_argument("overrides", nargs="*", help="config overrides, as for simulate")

    audit = sub.add_parser("audit", help="audit logs and privacy ledgers")
    asub = audit.add_subparsers(dest="action", required=True)
    verify = asub.add_parser("verify", help="verify hash-chained logs; report the first tampered entry")
    verify.add_argument("files", nargs="+", type=Path)
    compare = asub.add_parser("compare", help="run the same federation without and with DP (epsilon 8) and audit both")
    compare.add_argument("overrides", nargs="*", help="config overrides for both arms")

    report = sub.add_parser("report", help="(re)write a run's privacy report")
    report.add_argument("run_dir", type=Path)

    gen = sub.add_parser("generate", help="generate text with a run's adapter; flags PII; prints the privacy card")
    gen.add_argument("run_dir", type=Path)
    gen.add_argument("--prompt", default="", help="text to continue (default: unconditional)")
    gen.add_argument("--samples", type=int, default=1)
    gen.add_argument("--max-new-tokens", type=int, default=60)

    export = sub.add_parser("export", help="copy a run's adapter to a destination its contributing regions allow")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--to", dest="destination", type=Path, required=True)
    export.add_argument("--jurisdiction", required=True, help="where the model will be deployed, e.g. EU, US-CA")
    args = parser.parse_args(argv)

    # Nothing fedsov runs may fetch models or data sets.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.config_dir:
        os.environ["FEDSOV_CONFIG_DIR"] = str(args.config_dir.resolve())
    try:
        if args.command == "simulate":
            from server.simulation import simulate

            return simulate(args.overrides, args.config_dir)
        if args.command == "policy":
            return _policy(args)
        if args.command == "audit" and args.action == "verify":
            return _verify(args.files)
        if args.command == "audit":
            from server.compare import compare

            return compare(args.overrides)
        if args.command == "report":
            return _report(args.run_dir)
        if args.command == "generate":
            from server.generate import generate

            return generate(args.run_dir, args.prompt, samples=args.samples, max_new_tokens=args.max_new_tokens)
        if args.command == "export":
            from server.provenance import export_adapter

            out = export_adapter(args.run_dir, args.destination, args.jurisdiction)
            print(f"Exported {args.run_dir / 'adapter'} to {out} for deployment in {args.jurisdiction}.")
            return 0
    except FedsovError as err:
        print(f"fedsov: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsov: interrupted", file=sys.stderr)
        return 130
    return 1


def _region_file(name_or_path: str) -> Path:
    from common.config import default_config_dir

    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") else default_config_dir() / "regions" / f"{name_or_path}.yaml"


def _policy(args) -> int:
    from common.config import load_config, load_region_file
    from common.policy import explain_policy, policy_hash

    if args.action == "validate":
        failed = 0
        for file in args.files:
            try:
                region = load_region_file(file)
                print(f"OK {file}: region {region.name} ({region.jurisdiction}), {region.policy.law}, "
                      f"policy hash {policy_hash(region.policy)[:16]}")
            except FedsovError as err:
                failed += 1
                print(f"INVALID {err}")
        return 2 if failed else 0
    if args.action == "explain":
        region = load_region_file(_region_file(args.region))
        print(explain_policy(region.name, region.jurisdiction, region.policy))
        return 0
    from server.planning import dry_run

    cfg = load_config(args.overrides)
    policies = {name: load_region_file(_region_file(name)) for name in cfg.regions}
    print("\n".join(dry_run(cfg, policies)))
    return 0


def _report(run_dir: Path) -> int:
    from omegaconf import OmegaConf

    from common.config import config_from_container
    from server.report import write_privacy_report
    from server.rundir import RunDirectory

    run = RunDirectory(run_dir)
    if not run.config_path.is_file():
        raise FedsovError(f"{run_dir} holds no config.yaml: not a fedsov run directory.")
    report = write_privacy_report(run, config_from_container(OmegaConf.load(run.config_path)))
    print(f"Privacy report: {run.report_dir / 'privacy-report.html'} (and .md, .json)")
    for line in report["plain_summary"]:
        print(f"  {line}")
    return 1 if report["bound_violations"] else 0


def _verify(files: list[Path]) -> int:
    from common.audit import HashChainLog

    bad = 0
    for file in files:
        if not file.exists():
            print(f"{file}: no such file")
            bad += 1
            continue
        result = HashChainLog(file).verify()
        print(result.describe(file))
        bad += not result.ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
