#!/usr/bin/env python3
"""Memory and speed of DP-LoRA as the model grows: random-initialised Llama-shaped models.

For each shape (about 1M to 100M parameters on a CPU, up to 1B and more where CUDA is available),
one LoRA step on all linear layers: non-private, and DP-SGD with Opacus hooks (fedsov's training),
ghost clipping, and hooks under gradient checkpointing. Each (shape, mode) runs in its own process,
so its peak memory is its own (CPU: peak RSS of the process, and its growth over the loaded model;
CUDA: max allocated). Also the adapter's bytes (float32) and its share of the model, for PEFT's
default targets and for all linear layers. Ratios are within this one run on this machine.

    .venv/bin/python scripts/bench_model_scale.py                    # CPU ladder 1M-100M (~10 min on 2 cores)
    .venv/bin/python scripts/bench_model_scale.py --shapes 1M 10M    # some shapes only
    .venv/bin/python scripts/bench_model_scale.py --quick            # smoke: a micro shape, a few steps
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import device_name, each_in_own_process, time_training_steps, write_results  # noqa: E402  (scripts/ is on sys.path)

MODES = ("non-private", "hooks", "ghost", "hooks+checkpointing")


@dataclass(frozen=True)
class ScaleShape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    cuda_only: bool = False


# The CPU ladder keeps the embedded tokenizer's 2048-token vocabulary (a ~1M Llama has no room for a
# real one); the CUDA shapes are real ones: TinyLlama 1.1B, and Llama 3.2 3B with untied embeddings (3.6B).
SHAPES = {
    s.name: s
    for s in (
        ScaleShape("micro", 256, 64, 2, 4, 2, 128),
        ScaleShape("1M", 2048, 128, 2, 4, 2, 344),
        ScaleShape("10M", 2048, 256, 12, 8, 4, 688),
        ScaleShape("30M", 2048, 512, 8, 8, 4, 1376),
        ScaleShape("100M", 2048, 768, 14, 12, 4, 2048),
        ScaleShape("300M", 2048, 1024, 24, 16, 4, 2816),
        ScaleShape("1.1B", 32000, 2048, 22, 32, 4, 5632, cuda_only=True),
        ScaleShape("3.6B", 128256, 3072, 28, 24, 8, 8192, cuda_only=True),
    )
}
QUICK_SHAPES = ("micro",)
CPU_SHAPES = ("1M", "10M", "30M", "100M")
CUDA_SHAPES = (*CPU_SHAPES, "1.1B", "3.6B")
LORA_RANK = 16  # configs/model/hf.yaml's default


def build(shape: ScaleShape, device, dtype, checkpointing: bool = False):
    """The random-initialised model, created on `device` (before LoRA: opacus issue #820), frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.model.families import Shape, family_config
    from common.model.loading import frozen_base

    config = family_config(
        "llama",
        shape.vocab,
        Shape(
            hidden=shape.hidden,
            layers=shape.layers,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            intermediate=shape.intermediate,
            context=4096,
        ),
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return frozen_base(model, gradient_checkpointing=checkpointing)


def adapter_sizes(shape: ScaleShape) -> dict:
    """float32 adapter bytes and share of the model (counted on the meta device: nothing is allocated)."""
    import torch

    from common.config import LoraSettings
    from common.model.lora import attach_lora

    out = {}
    for label, targets in (("default", None), ("all-linear", ["all-linear"])):
        base = build(shape, torch.device("meta"), torch.float32)
        full = sum(p.numel() for p in base.parameters())
        model = attach_lora(base, LoraSettings(rank=LORA_RANK, alpha=2 * LORA_RANK, target_modules=targets), seed=0)
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[label] = {"adapter_bytes": 4 * adapter, "share": adapter / full}
        out["params"] = full
    return out


def run_one(shape: ScaleShape, mode: str, batch: int, length: int, steps: int, warmup: int, threads: int) -> dict:
    """One (shape, mode), in this process: seconds per step, tokens/s and peak memory."""
    import resource

    import psutil
    import torch

    torch.set_num_threads(threads)

    from common.config import DeviceChoice, DtypeChoice, LoraSettings
    from common.model.loading import pick_device, pick_dtype
    from common.model.lora import attach_lora

    device = pick_device(DeviceChoice.auto)
    dtype = pick_dtype(DtypeChoice.auto, device)
    base = build(shape, device, dtype, checkpointing=mode == "hooks+checkpointing")
    model = attach_lora(base, LoraSettings(rank=LORA_RANK, alpha=2 * LORA_RANK, target_modules=["all-linear"]), seed=0)
    ids = torch.randint(1, shape.vocab, (batch * (steps + warmup), length), generator=torch.Generator().manual_seed(0))
    loaded_mb = psutil.Process().memory_info().rss / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        loaded_mb = torch.cuda.memory_allocated() / 2**20
    times = time_training_steps(
        model, ids, "hooks" if mode == "hooks+checkpointing" else mode, batch, steps, warmup, device
    )
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    wall, cpu = (sorted(times[k])[len(times[k]) // 2] for k in ("wall", "cpu"))
    # Ratios use CPU seconds on a CPU (what this process computed, whoever else shares the cores) and
    # wall seconds on CUDA (the host only waits there).
    s_per_step = wall if device.type == "cuda" else cpu
    return {
        "shape": shape.name,
        "mode": mode,
        "s_per_step": s_per_step,
        "wall_s_per_step": wall,
        "cpu_s_per_step": cpu,
        "tokens_per_s": batch * length / s_per_step,
        "peak_mb": peak_mb,
        "loaded_mb": loaded_mb,
        "train_mb": peak_mb - loaded_mb,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a micro shape, a few steps: a smoke run")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: the CPU or CUDA ladder")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "model-scale")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared machine, one thread's CPU time is reproducible)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    batch, length, steps, warmup = (2, 16, 2, 1) if args.quick else ((8, 512, 5, 2) if cuda else (8, 128, 3, 1))
    names = args.shapes or (QUICK_SHAPES if args.quick else (CUDA_SHAPES if cuda else CPU_SHAPES))
    shapes = [SHAPES[n] for n in names if cuda or not SHAPES[n].cuda_only]
    sizes = {shape.name: adapter_sizes(shape) for shape in shapes}
    calls = [(shape, mode, batch, length, steps, warmup, args.threads) for shape in shapes for mode in args.modes]
    results = []
    for (shape, mode, *_), (result, why) in zip(calls, each_in_own_process(run_one, calls), strict=True):
        results.append(result or {"shape": shape.name, "mode": mode, "error": why[:300]})
        print(f"  {shape.name} {mode}: {json.dumps(results[-1])}", file=sys.stderr)
    for r in results:
        base = next(
            (b for b in results if b["shape"] == r["shape"] and b["mode"] == "non-private" and "error" not in b), None
        )
        if "error" not in r and base:
            r["time_ratio"] = r["s_per_step"] / base["s_per_step"]
            r["train_memory_ratio"] = r["train_mb"] / base["train_mb"] if base["train_mb"] > 0 else None
    total_mb = (torch.cuda.get_device_properties(0).total_memory if cuda else psutil_total()) / 2**20
    limits = {mode: memory_limit(results, sizes, mode, total_mb) for mode in args.modes}
    fastest = {}
    for shape in shapes:
        dp = [r for r in results if r["shape"] == shape.name and r["mode"] in ("hooks", "ghost") and "error" not in r]
        fastest[shape.name] = min(dp, key=lambda r: r["s_per_step"])["mode"] if dp else None
    record = {
        "benchmark": "model-scale",
        "quick": args.quick,
        "device": device_name(),
        "batch": batch,
        "threads": args.threads,
        "clock": "wall" if cuda else "process CPU",
        "sequence_length": length,
        "steps_timed": steps,
        "lora": {"rank": LORA_RANK, "targets": "all-linear"},
        "shapes": [{**asdict(s), **sizes[s.name]} for s in shapes],
        "results": results,
        "fastest_dp_mode": fastest,
        "memory_total_mb": total_mb,
        "memory_runs_out_at_params": limits,
    }
    write_results(args.out, "model-scale", record, table(record), plot=lambda figure: plot_scale(figure, record))
    return 0


def psutil_total() -> int:
    import psutil

    return psutil.virtual_memory().total


def memory_limit(results: list[dict], sizes: dict, mode: str, total_mb: float) -> float | None:
    """Parameters at which `mode`'s peak memory reaches `total_mb`, extrapolated along the line through
    the two largest shapes measured (same batch and sequence length); None without two points."""
    points = sorted(
        (sizes[r["shape"]]["params"], r["peak_mb"]) for r in results if r["mode"] == mode and "error" not in r
    )
    if len(points) < 2 or points[-1][0] == points[-2][0]:
        return None
    (p0, m0), (p1, m1) = points[-2:]
    per_param = (m1 - m0) / (p1 - p0)
    return p1 + (total_mb - m1) / per_param if per_param > 0 else None


def table(record: dict) -> list[str]:
    mem = "peak memory MB (CUDA allocated)" if record["device"].startswith("cuda") else "peak RSS MB"
    lines = [
        f"Model scale ({'quick' if record['quick'] else 'full'}; {record['device']}; batch {record['batch']} x "
        f"{record['sequence_length']} tokens; LoRA rank {LORA_RANK} on all linear layers; median of "
        f"{record['steps_timed']} steps, {record['clock']} seconds"
        + (f", {record['threads']} thread(s))" if record["clock"] != "wall" else ")"),
        "",
        f"| shape | params | mode | s/step | tokens/s | x non-private | {mem} | training MB | x non-private |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    params = {s["name"]: s["params"] for s in record["shapes"]}
    for r in record["results"]:
        head = f"| {r['shape']} | {params[r['shape']] / 1e6:.1f}M | {r['mode']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80]} | | | | | |")
            continue
        mem_ratio = f"{r['train_memory_ratio']:.2f}" if r.get("train_memory_ratio") else "n/a"
        lines.append(
            f"{head} {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {r.get('time_ratio', 0):.2f} | "
            f"{r['peak_mb']:.0f} | {r['train_mb']:.0f} | {mem_ratio} |"
        )
    lines += [
        "",
        "| shape | params | adapter bytes, default targets | share | adapter bytes, all linear | share |",
        "|---|---|---|---|---|---|",
    ]
    for s in record["shapes"]:
        default, every = s["default"], s["all-linear"]
        lines.append(
            f"| {s['name']} | {s['params']:,} | {default['adapter_bytes']:,} | {default['share']:.2%} "
            f"| {every['adapter_bytes']:,} | {every['share']:.2%} |"
        )
    lines += ["", "Fastest DP mode per shape: " + ", ".join(f"{k}: {v}" for k, v in record["fastest_dp_mode"].items())]
    limits = {m: v for m, v in record["memory_runs_out_at_params"].items() if v}
    if limits:
        lines.append(
            f"Memory ({record['memory_total_mb'] / 1024:.0f} GB) runs out at about, extrapolated from the two "
            "largest shapes: " + ", ".join(f"{m}: {v / 1e6:,.0f}M parameters" for m, v in limits.items())
        )
    return lines


def plot_scale(figure, record: dict) -> None:
    """Time and training memory of each DP mode relative to non-private LoRA, against model size."""
    params = {s["name"]: s["params"] for s in record["shapes"]}
    for i, (key, title) in enumerate((("time_ratio", "time per step"), ("train_memory_ratio", "training memory"))):
        ax = figure.add_subplot(1, 2, i + 1)
        for mode in MODES[1:]:
            points = [
                (params[r["shape"]], r[key]) for r in record["results"] if r["mode"] == mode and r.get(key) is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=mode)
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(f"{title}, x non-private")
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
