#!/usr/bin/env python3
"""Privacy vs utility: held-out perplexity and canary exposure at epsilon 1, 3, 8 and without DP,
with LoRA and with FFA-LoRA (A frozen, only B trained), on the same data, seeds and canaries.

The federation is `fedsov audit compare`'s (us + sg, one client each, 50 local steps, 5 rounds):
few clients per aggregation and many local steps, so that without DP the repeated canaries are
memorised and exposure has something to measure. Every arm gets the first arm's canaries.
The no-DP arms run on a lab copy of the region policies (the presets require DP).

    .venv/bin/python scripts/bench_privacy_utility.py            # full: 8 arms, embedded model (~1 h on 2 cores)
    .venv/bin/python scripts/bench_privacy_utility.py --quick    # smoke: micro model, 1 round, 2 arms
                                                                 # (LoRA without DP, FFA-LoRA at epsilon 8)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MICRO, device_name, write_results  # noqa: E402  (scripts/ is on sys.path when run)

NO_DP = "no DP"
QUICK = [
    *MICRO,
    "model.max_length=96",
    "data.users_per_region=60",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "audit.exposure_candidates=50",
    "audit.one_run_canaries=8",
    "audit.one_run_candidates=50",
    "audit.generations=2",
    "audit.mia_members=30",
]
# Perplexity at epsilon 8 within this factor of the non-private run (issue 7's goal).
UTILITY_GOAL = 1.05


def arm_name(epsilon: str, ffa: bool) -> str:
    return f"{'ffa-lora' if ffa else 'lora'}-{'no-dp' if epsilon == NO_DP else 'eps' + epsilon}"


def summarise(report: dict) -> dict:
    """What the sweep compares, from one run's privacy report."""
    regions = report["regions"]
    eps = [r["epsilon"] for r in regions.values()]
    exposure: dict[str, float] = {}
    mean: dict[str, list[tuple[float, int]]] = {}
    for r in regions.values():
        for reps, e in ((r.get("audit") or {}).get("exposure") or {}).items():
            exposure[reps] = max(exposure.get(reps, 0.0), e["max_bits"])
            mean.setdefault(reps, []).append((e["mean_bits"], e["canaries"]))
    return {
        "epsilon": "inf" if "inf" in eps else max(float(e) for e in eps),
        "perplexity_before": report["perplexity_by_round"][0]["overall"],
        "perplexity_after": report["perplexity_by_round"][-1]["overall"],
        "perplexity_by_region": {n: r["perplexity_after"] for n, r in regions.items()},
        "max_exposure_bits": exposure,
        # The max over a handful of canaries is a noisy statistic; the mean shows the trend.
        "mean_exposure_bits": {k: sum(b * n for b, n in v) / sum(n for _, n in v) for k, v in mean.items()},
        "verdicts": {n: r["verdict"]["status"] for n, r in regions.items()},
        "bound_violations": report["bound_violations"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epsilons", nargs="+", default=None, help="target epsilons (default 1 3 8)")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=("lora", "ffa-lora"),
        default=["lora", "ffa-lora"],
        help="LoRA kinds to sweep (default both)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-read the arms' finished runs under --out and rewrite the table, running nothing",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "privacy-utility")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    epsilons = [NO_DP, *(args.epsilons or ["8", "3", "1"])]
    for e in epsilons[1:]:
        if not (e.replace(".", "", 1).isdigit() and float(e) > 0):
            parser.error(f"--epsilons takes positive numbers, got {e!r}")
    kinds = [kind == "ffa-lora" for kind in dict.fromkeys(args.kinds)]
    # Quick mode runs two arms only: without DP on the first kind, epsilon 8 on the last (both, by default).
    plan = (
        [(NO_DP, kinds[0]), ("8", kinds[-1])]
        if args.quick and not args.epsilons
        else [(e, ffa) for ffa in kinds for e in epsilons]
    )

    from common.config import default_config_dir
    from server.compare import AUDIT_FEDERATION, run_arm, write_lab_policies
    from server.report import load_report

    root = args.out / "runs"
    lab = (
        None
        if args.report_only
        else write_lab_policies(args.out / "lab-configs", why="bench_privacy_utility: no-DP baseline", require_dp=False)
    )
    base = [*AUDIT_FEDERATION, *(QUICK if args.quick else []), *args.overrides]
    arms = []
    first = None
    for epsilon, ffa in plan:
        name = arm_name(epsilon, ffa)
        privacy = (
            ["privacy=off"]
            if epsilon == NO_DP
            else [f"privacy.target_epsilon={epsilon}", "privacy.noise_multiplier=null"]
        )
        if args.report_only:
            if not (root / name / "run" / "summary.json").is_file():
                print(
                    f"--report-only: no finished run for arm {name} in {root / name / 'run'}; "
                    f"run the sweep without --report-only first (same --out, --kinds, --epsilons)",
                    file=sys.stderr,
                )
                return 1
            code, report = 0, load_report(root / name / "run")
        else:
            code, report = run_arm(
                root,
                name,
                [*base, f"model.lora.ffa={str(ffa).lower()}", *privacy],
                lab.resolve() if epsilon == NO_DP else default_config_dir(),
                canaries_from=first,
                out=lambda line: None,
            )
        if code != 0:
            print(f"arm {name} failed (exit {code}); see {root / name / 'run'}", file=sys.stderr)
            return 1
        first = first or root / name
        arms.append({"arm": name, "ffa": ffa, "target_epsilon": epsilon, **summarise(report)})
        print(
            f"{name}: perplexity {arms[-1]['perplexity_after']:.2f}, exposure {arms[-1]['max_exposure_bits']}",
            flush=True,
        )

    # Each arm against the non-private run of its own LoRA kind (LoRA's where that kind has none).
    lora_no_dp = next(
        (a for a in arms if not a["ffa"] and a["target_epsilon"] == NO_DP),
        next((a for a in arms if a["target_epsilon"] == NO_DP), arms[0]),
    )
    for a in arms:
        own = next((b for b in arms if b["ffa"] == a["ffa"] and b["target_epsilon"] == NO_DP), lora_no_dp)
        a["perplexity_x_no_dp"] = a["perplexity_after"] / own["perplexity_after"]
        a["perplexity_x_lora_no_dp"] = a["perplexity_after"] / lora_no_dp["perplexity_after"]
    top = max(arms[0]["max_exposure_bits"], key=int, default=None)
    at8 = [a for a in arms if a["target_epsilon"] != NO_DP and float(a["target_epsilon"]) == 8]
    best8 = min(at8, key=lambda a: a["perplexity_after"]) if at8 else None
    goal_met = bool(best8 and best8["perplexity_x_lora_no_dp"] <= UTILITY_GOAL)

    lines = [
        f"Privacy vs utility ({'quick' if args.quick else 'full'}; {device_name()}; federation of "
        f"`fedsov audit compare`; perplexity before training {arms[0]['perplexity_before']:.1f})",
        "",
        "| LoRA | target epsilon | epsilon spent | held-out perplexity | x no-DP (same LoRA) | x LoRA no-DP | "
        f"max exposure bits ({', '.join(k + 'x' for k in sorted(arms[0]['max_exposure_bits'], key=int))}) | "
        f"mean exposure bits, {top}x | audit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        spent = a["epsilon"] if a["epsilon"] == "inf" else f"{a['epsilon']:.2f}"
        bits = " / ".join(f"{a['max_exposure_bits'][k]:.1f}" for k in sorted(a["max_exposure_bits"], key=int))
        verdicts = ", ".join(f"{r}: {v}" for r, v in a["verdicts"].items())
        lines.append(
            f"| {'FFA-LoRA' if a['ffa'] else 'LoRA'} | {a['target_epsilon']} | {spent} | "
            f"{a['perplexity_after']:.2f} | {a['perplexity_x_no_dp']:.2f} | {a['perplexity_x_lora_no_dp']:.2f} | "
            f"{bits} | {a['mean_exposure_bits'].get(top, math.nan):.1f} | {verdicts} |"
        )
    if best8:
        lines += [
            "",
            f"At epsilon 8 the best arm ({best8['arm']}) reaches {best8['perplexity_x_lora_no_dp']:.2f}x the "
            f"non-private perplexity; goal <= {UTILITY_GOAL}x: {'met' if goal_met else 'MISSED'}",
        ]
    record = {
        "benchmark": "privacy-utility",
        "quick": args.quick,
        "device": device_name(),
        "federation": list(base),
        "arms": arms,
        "goal": f"perplexity at epsilon 8 <= {UTILITY_GOAL}x non-private",
        "goal_met": goal_met,
    }
    write_results(args.out, "privacy-utility", record, lines, plot=lambda fig: plot_sweep(fig, arms, epsilons, top))
    return 0


def plot_sweep(figure, arms: list[dict], epsilons: list[str], top: str | None) -> None:
    """Perplexity, and exposure of the most repeated canaries (mean solid, max dotted), against
    epsilon, one colour per LoRA kind."""
    order = sorted((e for e in epsilons if e != NO_DP), key=float) + [NO_DP]
    panels = [("perplexity", "held-out perplexity")]
    if top:
        panels.append(("exposure", f"{top}x canaries: exposure bits (mean; max dotted)"))
    for i, (key, title) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), i + 1)
        for ffa in sorted({a["ffa"] for a in arms}):
            by = {a["target_epsilon"]: a for a in arms if a["ffa"] == ffa}
            xs = [i for i, e in enumerate(order) if e in by]
            label, colour = ("FFA-LoRA", "tab:orange") if ffa else ("LoRA", "tab:blue")
            if key == "perplexity":
                ax.plot(xs, [by[order[i]]["perplexity_after"] for i in xs], marker="o", label=label, color=colour)
            else:
                ax.plot(
                    xs,
                    [by[order[i]]["mean_exposure_bits"].get(top, math.nan) for i in xs],
                    marker="o",
                    label=label,
                    color=colour,
                )
                ax.plot(
                    xs, [by[order[i]]["max_exposure_bits"].get(top, math.nan) for i in xs], linestyle=":", color=colour
                )
        ax.set_xticks(range(len(order)), [e if e == NO_DP else f"eps {e}" for e in order])
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
