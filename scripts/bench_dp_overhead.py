#!/usr/bin/env python3
"""DP overhead: time per training step and peak memory, DP-LoRA vs non-private LoRA.

Same model, batch, sequence length and LoRA targets; Opacus's per-sample gradient modes
(hooks, functorch, ghost clipping) against plain LoRA training. Each mode runs in its own
process, so peak memory (CUDA: max allocated; CPU: peak RSS growth over the loaded model) is
its own. Writes JSON and a Markdown table with ratios measured in this one run.

    .venv/bin/python scripts/bench_dp_overhead.py            # full: embedded default model, batch 16 x 128 tokens
    .venv/bin/python scripts/bench_dp_overhead.py --quick    # smoke: micro model, a few steps (< 1 min)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MICRO, device_name, each_in_own_process, time_training_steps, write_results  # noqa: E402  (scripts/ is on sys.path)

MODES = ("non-private", "hooks", "functorch", "ghost")


def run_mode(mode: str, overrides: list[str], batch: int, length: int, steps: int, warmup: int) -> dict:
    """One mode, in this process: returns seconds per step and peak memory."""
    import resource

    import torch

    from common.config import load_config
    from common.model.loading import load_base_model, pick_device, pick_dtype, resolve_model_path
    from common.model.lora import attach_lora

    cfg = load_config(overrides)
    device = pick_device(cfg.model.device)
    path = resolve_model_path(cfg.model, log=lambda m: None)
    base = load_base_model(path, device, pick_dtype(cfg.model.dtype, device))
    model = attach_lora(base, cfg.model.lora, seed=0)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch * (steps + warmup), length), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = time_training_steps(model, ids, mode, batch, steps, warmup, device)["wall"]
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # KiB on Linux
    times.sort()
    return {
        "mode": mode,
        "s_per_step": times[len(times) // 2],
        "peak_mb": peak_mb,
        "device": device.type,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="micro model, few steps: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "dp-overhead")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    batch, length, steps, warmup = (4, 32, 3, 1) if args.quick else (16, 128, 20, 3)
    overrides = [*(MICRO if args.quick else []), *args.overrides]
    calls = [(mode, overrides, batch, length, steps, warmup) for mode in MODES]
    # A mode Opacus cannot apply to this model is reported, not hidden.
    results = [
        result or {"mode": mode, "error": why}
        for (mode, *_), (result, why) in zip(calls, each_in_own_process(run_mode, calls), strict=True)
    ]
    base = next(r for r in results if r["mode"] == "non-private")
    for r in results:
        if "error" not in r:
            r["time_ratio"] = r["s_per_step"] / base["s_per_step"]
            r["memory_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None
    dp = [r for r in results if r["mode"] != "non-private" and "error" not in r]
    best = min(dp, key=lambda r: r["s_per_step"]) if dp else None
    record = {
        "benchmark": "dp-overhead",
        "quick": args.quick,
        "batch": batch,
        "sequence_length": length,
        "steps_timed": steps,
        "device": device_name(),
        "results": results,
        "best_dp_mode": best and best["mode"],
        "goal": "best DP mode <= 1.15x the non-private step",
        "goal_met": bool(best and best["time_ratio"] <= 1.15),
    }
    lines = [
        f"DP overhead ({'quick' if args.quick else 'full'}; {device_name()}; batch {batch} x {length} tokens; "
        f"median of {steps} steps)",
        "",
        "| mode | s/step | x non-private | peak memory MB | x non-private |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error'][:80]} | | | |")
        else:
            mem = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "n/a"
            lines.append(
                f"| {r['mode']} | {r['s_per_step']:.4f} | {r['time_ratio']:.2f} | {r['peak_mb']:.1f} | {mem} |"
            )
    lines += [
        "",
        f"Best DP mode: {record['best_dp_mode']}; goal (<= 1.15x): {'met' if record['goal_met'] else 'MISSED'}",
    ]
    write_results(args.out, "dp-overhead", record, lines, plot=lambda figure: plot_ratios(figure, results))
    return 0


def plot_ratios(figure, results: list[dict]) -> None:
    """Time and peak memory of each mode relative to non-private LoRA, with the 1.15x goal line."""
    ok = [r for r in results if "error" not in r]
    names = [r["mode"] for r in ok]
    for i, (key, title) in enumerate((("time_ratio", "time per step"), ("memory_ratio", "peak memory"))):
        ax = figure.add_subplot(1, 2, i + 1)
        ax.bar(names, [r.get(key) or 0 for r in ok], color=["grey"] + ["tab:blue"] * (len(ok) - 1))
        if key == "time_ratio":
            ax.axhline(1.15, color="tab:red", linestyle="--", label="goal 1.15x")
            ax.legend()
        ax.set_title(f"{title}, x non-private")


if __name__ == "__main__":
    sys.exit(main())
