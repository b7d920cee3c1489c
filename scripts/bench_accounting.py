#!/usr/bin/env python3
"""Privacy accounting: PLD against RDP (epsilon and the sigma each asks for), and what a call costs.

Epsilon and sigma on the default run's setting (32 of about 230 units per batch, 10 local steps x 5 rounds,
delta 1e-5) at several targets; then the time of a fresh and of a cached call for the histories a ledger
holds. The ledger asks for epsilon on every message a node handles, so the cached call is the one it pays
most. Writes JSON and a Markdown table with ratios and seconds measured in this one run.

    .venv/bin/python scripts/bench_accounting.py [--out bench/accounting]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import write_results  # noqa: E402  (scripts/ is on sys.path when run)

from common.privacy.accounting import DpSgdSteps, epsilon_rdp, epsilon_spent, noise_for_target  # noqa: E402

DELTA = 1e-5
Q = 32 / 230
STEPS = 10 * 5
TARGETS = (8.0, 3.0, 1.0, 0.5)  # below ~0.3 Opacus's RDP (orders up to 63) reaches no target


def rdp_noise_for_target(target: float) -> float:
    """The sigma the old accountant chose: Opacus's search over its RDP epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return get_noise_multiplier(target_epsilon=target, target_delta=DELTA, sample_rate=Q, steps=STEPS)


def seconds(call, repeats: int = 1) -> float:
    """Median wall time of `repeats` calls (one call: the first, which fills the caches)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_accountants() -> tuple[list[dict], list[str]]:
    rows, lines = (
        [],
        [
            "| target epsilon | sigma PLD | sigma RDP | sigma RDP / PLD | at sigma PLD: epsilon PLD "
            "| epsilon RDP | RDP / PLD | at sigma RDP: epsilon PLD |",
            "|---|---|---|---|---|---|---|---|",
        ],
    )
    for target in TARGETS:
        sigma_pld, sigma_rdp = noise_for_target(target, DELTA, Q, STEPS), rdp_noise_for_target(target)
        history = [DpSgdSteps(sigma_pld, Q, STEPS)]
        eps_pld, eps_rdp = epsilon_spent(history, DELTA), epsilon_rdp(history, DELTA)
        # What a run that took RDP's sigma really spent.
        eps_old = epsilon_spent([DpSgdSteps(sigma_rdp, Q, STEPS)], DELTA)
        rows.append(
            {
                "target": target,
                "sigma_pld": sigma_pld,
                "sigma_rdp": sigma_rdp,
                "epsilon_pld": eps_pld,
                "epsilon_rdp": eps_rdp,
                "epsilon_pld_at_sigma_rdp": eps_old,
            }
        )
        lines.append(
            f"| {target:g} | {sigma_pld:.4f} | {sigma_rdp:.4f} | {sigma_rdp / sigma_pld:.3f} | "
            f"{eps_pld:.4f} | {eps_rdp:.4f} | {eps_rdp / eps_pld:.3f} | {eps_old:.4f} |"
        )
    return rows, lines


def time_calls() -> tuple[list[dict], list[str]]:
    # Each case uses (sigma, q) pairs no earlier call used, so its first call finds nothing cached.
    mixed = [DpSgdSteps(0.8 + 0.05 * i, 0.10 + 0.004 * i, 50) for i in range(20)]
    cases = {
        "(a) one segment, 50 steps": lambda: epsilon_spent([DpSgdSteps(1.21, Q, 50)], DELTA),
        "(b) 20 rounds x 50 steps, same (sigma, q)": lambda: epsilon_spent([DpSgdSteps(1.31, Q, 50)] * 20, DELTA),
        "(c) 20 segments x 50 steps, 20 (sigma, q)": lambda: epsilon_spent(mixed, DELTA),
        "(d) noise_for_target, 250 steps": lambda: noise_for_target(3.0, DELTA, Q, 250),
    }
    rows, lines = [], ["| call | fresh s | cached s | fresh / cached |", "|---|---|---|---|"]
    for name, call in cases.items():
        fresh, cached = seconds(call), seconds(call, repeats=1000)
        rows.append({"call": name, "fresh_s": fresh, "cached_s": cached})
        lines.append(f"| {name} | {fresh:.4f} | {cached:.2e} | {fresh / cached:,.0f} |")
    # What a ledger pays once per round: a new round on top of a history whose segments are cached.
    grown = mixed[:19] + [DpSgdSteps(1.9, 0.2, 50)]
    appended = seconds(lambda: epsilon_spent(grown, DELTA))
    rows.append({"call": "(e) (c) with its last round new", "fresh_s": appended})
    lines.append(f"| (e) (c) with its last round new | {appended:.4f} | | |")
    return rows, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "accounting")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    epsilon_spent([DpSgdSteps(2.5, 0.05, 7)], DELTA)  # imports and first FFT out of the timings
    accountants, accountant_lines = compare_accountants()
    timings, timing_lines = time_calls()
    # Seconds scale with what else the machine runs: the load says how much that was.
    machine = f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}"
    lines = [
        f"Privacy accounting (q = 32/230 = {Q:.4f}, {STEPS} steps, delta {DELTA:g}; {machine})",
        "",
        *accountant_lines,
        "",
        *timing_lines,
    ]
    write_results(
        args.out,
        "accounting",
        {
            "sample_rate": Q,
            "steps": STEPS,
            "delta": DELTA,
            "machine": machine,
            "accountants": accountants,
            "timings": timings,
        },
        lines,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
