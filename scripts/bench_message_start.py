#!/usr/bin/env python3
"""Per-message start cost of a deployed node's ClientApp process (Flower starts one per message).

Measures, in fresh Python processes on this machine, what a ClientApp pays before it can answer:
  light  - a secure-aggregation stage (shares / mask / unmask): import + policy gate only
  node   - describe: import + every start check (policy, residency, data, tokenizer)
  model  - train/evaluate: the above + the base model with LoRA attached, ready to train
and the same work repeated inside one warm process (what simulation's Ray actors pay).

    .venv/bin/python scripts/bench_message_start.py [--repeats 3] [--out bench/message-start] [overrides...]
    .venv/bin/python scripts/bench_message_start.py --quick    # smoke: micro model, small data

Uses the embedded default model (built on first use) and the default synthetic data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MICRO, device_name, write_results  # noqa: E402  (scripts/ is on sys.path when run)

STAGE_NAMES = {"light": "secure-aggregation stage", "node": "describe (start checks)", "model": "train/evaluate (model ready)"}

STAGE_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
stage, overrides, node_config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
import client.app  # what flwr-clientapp loads for every message
from client.settings import PolicyGate, deployment_settings
from common.config import load_config
settings = deployment_settings(load_config(overrides), node_config)
def once():
    PolicyGate(settings)
    if stage == "light":
        return
    from client.node import RegionNode, cached_peft_model
    node = RegionNode(settings)
    if stage == "model":
        from common.config import LoraSettings
        lora = settings.model.lora
        cached_peft_model(node._model_path, settings.model, LoraSettings(rank=lora.rank, alpha=lora.alpha,
                          dropout=lora.dropout, target_modules=lora.target_modules), 0)
once()
cold = time.perf_counter() - t0
t1 = time.perf_counter()
once()
print(json.dumps({"cold_s": cold, "warm_s": time.perf_counter() - t1}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="micro model, small data, one repeat: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "message-start")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
        args.overrides = [*MICRO, "data.users_per_region=40", *args.overrides]

    from common.config import load_config
    from common.data.prepare import ensure_synthetic_data
    from common.model.loading import resolve_model_path

    cfg = load_config(args.overrides)
    ensure_synthetic_data(cfg, log=print)
    resolve_model_path(cfg.model, log=print)
    state = Path(tempfile.mkdtemp(prefix="fedsov-bench-node-"))
    node_config = {"region": "eu", "data-path": str(Path(cfg.data.root) / "eu"), "state-dir": str(state),
                   "synthetic-data": True, "model-cache": cfg.model.cache_dir, "threads": 1}
    results = {}
    for stage in ("light", "node", "model"):
        runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", STAGE_CODE, stage, json.dumps(args.overrides),
                                   json.dumps(node_config)], cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            runs.append({"process_wall_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])})
        results[stage] = {
            "process_wall_s": statistics.median(r["process_wall_s"] for r in runs),
            "cold_s": statistics.median(r["cold_s"] for r in runs),
            "warm_s": statistics.median(r["warm_s"] for r in runs),
        }
    record = {"benchmark": "message-start", "quick": args.quick, "device": device_name(),
              "python": sys.version.split()[0], "model": cfg.model.name_or_path, "repeats": args.repeats,
              "stages": results}
    lines = [f"Per-message start cost of a deployed ClientApp ({'quick' if args.quick else 'full'}; {device_name()}; "
             f"median of {args.repeats})", "",
             "| message kind | new process (wall) | of which fedsov work | same work in a warm process | cold/warm |",
             "|---|---|---|---|---|"]
    for stage, r in results.items():
        ratio = r["cold_s"] / max(r["warm_s"], 1e-3)
        lines.append(f"| {STAGE_NAMES[stage]} | {r['process_wall_s']:.2f} s | {r['cold_s']:.2f} s | "
                     f"{r['warm_s']:.3f} s | {ratio:.0f}x |")
    write_results(args.out, "message-start", record, lines, plot=lambda fig: plot_stages(fig, results))
    return 0


def plot_stages(figure, results: dict) -> None:
    """Seconds per message: a fresh process (what deployment pays) against a warm one (simulation)."""
    ax = figure.add_subplot(1, 1, 1)
    names = [STAGE_NAMES[s] for s in results]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["process_wall_s"] for r in results.values()], width=0.4, label="new process")
    ax.bar([x + 0.2 for x in xs], [r["warm_s"] for r in results.values()], width=0.4, label="warm process")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds per message")
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())
