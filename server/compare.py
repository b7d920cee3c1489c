"""`fedsov audit compare`: the same federation without DP and with DP, audited side by side.

Evidence that DP does its job, and that the audit has the power to see memorisation: without DP
the repeated canaries must come out, with DP they must not. Both arms use the same data, the same
canaries (copied from the first arm's nodes) and the same settings; each arm has its own node state
(ledgers), since training without DP leaves a dataset with infinite epsilon.

The no-DP arm is a lab setting: it runs with a copy of the region policies relaxed to allow training
without DP. Never point it at real personal data.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from common.config import CONFIG_DIR_ENV, default_config_dir, load_config
from common.errors import ConfigError, FederationError
from common.paths import writable_folder
from server.report import load_report
from server.simulation import simulate

# A federation small and intense enough for memorisation to show without DP: few clients per
# aggregation (averaging dilutes each client's canaries) and many local steps per round.
AUDIT_FEDERATION = (
    "regions=[us,sg]",
    "regions.us.clients=1",
    "regions.sg.clients=1",
    "federation.local_steps=50",
    "model.lora.target_modules=[c_attn,c_proj,c_fc]",
    "model.lora.rank=8",  # more capacity to memorise than the default's rank 4: the audit needs something to see
    # One copy of a 6-digit secret is barely memorised here even without DP (about 1-3 bits of exposure), so
    # one-run canaries in 1 copy cannot show power; in 4 copies the audit measures a group of 4 units' epsilon.
    "audit.one_run_repetitions=4",
)


ARMS = ("no-dp", "dp-eps8")


def compare(overrides: Sequence[str], out: Callable[[str], None] = print, report_only: bool = False) -> int:
    base = load_config([*AUDIT_FEDERATION, *overrides])
    root = writable_folder(Path(base.workdir) / "compare", "workdir=<folder>")
    if report_only:
        return _write_comparison(root, _finished_reports(root), out)
    lab_configs = root / "lab-configs"
    write_lab_policies(lab_configs, why="fedsov audit compare: DP not required", require_dp=False)
    arms = {  # in ARMS' order
        "no-dp": (["privacy=off"], lab_configs),
        "dp-eps8": (["privacy.target_epsilon=8", "privacy.noise_multiplier=null"], default_config_dir()),
    }
    reports = {}
    for name, (arm_overrides, policies) in arms.items():
        code, report = run_arm(
            root,
            name,
            [*AUDIT_FEDERATION, *overrides, *arm_overrides],
            policies,
            canaries_from=None if name == "no-dp" else root / "no-dp",
            out=out,
        )
        if code != 0:
            return code
        reports[name] = report
    return _write_comparison(root, reports, out)


def _finished_reports(root: Path) -> dict:
    missing = [name for name in ARMS if not (root / name / "run" / "summary.json").is_file()]
    if missing:
        raise ConfigError(
            f"--report-only: no finished run for arm(s) {', '.join(missing)} under {root}; "
            "run `fedsov audit compare` without --report-only first (same workdir)."
        )
    return {name: load_report(root / name / "run") for name in ARMS}


def _write_comparison(root: Path, reports: dict, out: Callable[[str], None]) -> int:
    verdict, lines = judge(reports)
    out("\n" + "\n".join(lines))
    (root / "compare.json").write_text(json.dumps({"verdict": verdict, "arms": reports}, indent=1, ensure_ascii=False))
    (root / "compare.md").write_text("\n".join(lines) + "\n")
    out(f"\nWritten: {root / 'compare.md'}, {root / 'compare.json'}; reports in {root}/*/run/report/")
    return 0 if verdict == "DP works and the audit has power" else 1


def run_arm(
    root: Path,
    name: str,
    overrides: Sequence[str],
    policies: Path,
    *,
    canaries_from: Path | None,
    out: Callable[[str], None] = print,
) -> tuple[int, dict | None]:
    """One arm of a comparison: a federation in `root/name` on the shared data in `root/data`.

    Its nodes read their policies from `policies`; with `canaries_from` (an earlier arm's folder)
    they get that arm's canaries, so every arm measures the same secrets. Returns the exit code and
    the run's privacy report (None when the run failed).
    """
    workdir = root / name
    if workdir.exists():
        shutil.rmtree(workdir)
    if canaries_from is not None:
        _copy_canaries(canaries_from / "nodes", workdir / "nodes")
    out(f"\n=== arm {name} (policies from {policies}) ===")
    # Nodes read their policies from $FEDSOV_CONFIG_DIR, in this process and the simulation's.
    previous = os.environ.get(CONFIG_DIR_ENV)
    os.environ[CONFIG_DIR_ENV] = str(policies)
    try:
        code = simulate(
            [*overrides, f"workdir={workdir}", f"data.root={root / 'data'}", f"run_dir={workdir / 'run'}"], out=out
        )
    finally:
        if previous is None:
            os.environ.pop(CONFIG_DIR_ENV, None)
        else:
            os.environ[CONFIG_DIR_ENV] = previous
    if code != 0:
        out(f"arm {name} failed (exit {code}); see {workdir / 'run'}")
        return code, None
    return 0, load_report(workdir / "run")


def judge(reports: dict) -> tuple[str, list[str]]:
    """The comparison table and its verdict.

    Exposure is the mean over each repetition count's canaries, beside the mean of the one-run canaries that were
    never inserted (what chance gives). A secret in k copies, each its own unit, is protected only at about
    k x epsilon (group privacy), so memorisation of repeated canaries under DP is reported with that epsilon and
    is not held against DP; secrets in one unit, extraction and membership inference are.
    """
    nodp, dp = reports["no-dp"], reports["dp-eps8"]
    lines = [
        "| region | arm | epsilon | perplexity after | mean exposure (bits) by repetitions; never inserted | "
        "extracted | MIA AUC (loss / calibrated) | one-run: right / guesses, lower bound (copies) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bounds: dict[str, list[float]] = {"no DP": [], "DP eps=8": []}
    for region in nodp["regions"]:
        for arm, rep in (("no DP", nodp), ("DP eps=8", dp)):
            r = rep["regions"].get(region)
            if not r or not r["audit"] or "exposure" not in r["audit"]:
                lines.append(f"| {region} | {arm} | - | - | - | - | - | - | not audited |")
                continue
            a = r["audit"]
            never = a.get("never_inserted")
            exposure = ", ".join(f"{k}x: {e['mean_bits']:.1f}" for k, e in a["exposure"].items())
            exposure += f"; {never['mean_bits']:.1f}" if never else ""
            extracted = int(sum(e["extracted_greedy"] + e["extracted_beam"] for e in a["exposure"].values()))
            eps = r["epsilon"] if r["epsilon"] == "inf" else f"{float(r['epsilon']):.2f}"
            # A region of one node has no perplexity of its own in the report (it would be that node's).
            perplexity = (
                f"{r['perplexity_after']:.2f}"
                if r["perplexity_after"] is not None
                else f"overall {rep['perplexity_by_round'][-1]['overall']:.2f}"
            )
            o = a["one_run"]
            bounds[arm].append(o["epsilon_lower_bound"])
            copies = o.get("repetitions", 1)
            lines.append(
                f"| {region} | {arm} | {eps} | {perplexity} | {exposure} | {extracted} | "
                f"{a['mia']['loss-auc']:.2f} / {a['mia']['calibrated-auc']:.2f} | "
                f"{o['correct']}/{o['guesses']}: {o['epsilon_lower_bound']:.2f} ({copies}) | {r['verdict']['status']} |"
            )
    nodp_detected = any(r["verdict"]["status"] == "memorisation detected" for r in nodp["regions"].values())
    dp_detected = any(
        r["verdict"]["status"] == "memorisation detected" and not r["verdict"].get("repeated_secrets_only")
        for r in dp["regions"].values()
    )
    violations = nodp["bound_violations"] + dp["bound_violations"]
    if violations:
        verdict = "AUDIT FAILED: " + "; ".join(violations)
    elif not nodp_detected:
        verdict = "the audit has NO POWER: without DP it found no memorisation"
    elif dp_detected:
        verdict = "DP did NOT prevent memorisation"
    else:
        verdict = "DP works and the audit has power"
    notes = [
        f"{region}: with DP, {'; '.join(r['verdict']['signals'])}"
        for region, r in dp["regions"].items()
        if r["verdict"].get("repeated_secrets_only")
    ]
    power = max(bounds["no DP"], default=0.0)
    copies = max((r["audit"]["one_run"].get("repetitions", 1) for r in _audited(nodp)), default=1)
    unit = "a single unit" if copies == 1 else f"a group of {copies} units (a canary in {copies} copies)"
    notes.append(
        f"One-run audit: empirical epsilon lower bound {power:.2f} without DP"
        + (f" (above 1: the audit sees the influence of {unit})" if power > 1 else f" (at most 1: too weak for {unit})")
        + f", {max(bounds['DP eps=8'], default=0.0):.2f} with DP (accounted epsilon "
        + ", ".join(f"{float(r['epsilon']):.2f}" for r in dp["regions"].values() if r["epsilon"] != "inf")
        + ")."
    )
    return verdict, lines + [""] + [f"- {n}" for n in notes] + ["", f"Verdict: {verdict}."]


def _audited(report: dict) -> list[dict]:
    return [r for r in report["regions"].values() if r.get("audit") and "one_run" in r["audit"]]


def write_lab_policies(
    config_dir: Path, *, why: str, require_dp: bool | None = None, require_secure_aggregation: bool | None = None
) -> Path:
    """A copy of the configs in which the region policies are relaxed for a lab measurement.

    Only the named switches change; everything else (transfers, data use, budgets) stays as the
    regions wrote it. Never point a federation using these at real personal data.
    """
    from omegaconf import OmegaConf

    if config_dir.exists():
        shutil.rmtree(config_dir)
    shutil.copytree(default_config_dir(), config_dir)
    for path in (config_dir / "regions").glob("*.yaml"):
        cfg = OmegaConf.load(path)
        if require_dp is not None:
            cfg.policy.privacy.require_dp = require_dp
        if require_secure_aggregation is not None:
            cfg.policy.transfers.require_secure_aggregation = require_secure_aggregation
        # Hydra reads the package directive only from the file's first line.
        path.write_text(
            f"# @package regions.{path.stem}\n# LAB COPY ({why}). Never use with real data.\n" + OmegaConf.to_yaml(cfg)
        )
    return config_dir


def _copy_canaries(source_nodes: Path, target_nodes: Path) -> None:
    from common.leakage.canaries import CANARY_FILE

    if not source_nodes.exists():
        raise FederationError(f"No nodes in {source_nodes}: the no-DP arm must run first.")
    for node in source_nodes.iterdir():
        canaries = node / CANARY_FILE
        if canaries.exists():
            (target_nodes / node.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(canaries, target_nodes / node.name / CANARY_FILE)
