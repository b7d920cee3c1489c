#!/usr/bin/env python3
"""Communication and secure-aggregation cost, measured on simulated federations (`fedsov simulate`).

For each client count, the same federation runs with and without secure aggregation; from each
run's metrics.jsonl it takes the round time (median over rounds) and the bytes each client
uploaded per round, and from the model itself the adapter and full-model sizes (float32). Ratios
are within this one run on this machine.

    .venv/bin/python scripts/bench_federation.py                      # full: 3, 6, 12 clients, embedded model
    .venv/bin/python scripts/bench_federation.py --clients 3 6 12 24 48 --rounds 2   # scale curve
    .venv/bin/python scripts/bench_federation.py --quick              # smoke: 3 clients, micro model, 1 round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import device_name, write_results  # noqa: E402  (scripts/ is on sys.path when run)

MICRO = ["model.embedded.n_layer=2", "model.embedded.n_head=2", "model.embedded.n_embd=64",
         "model.embedded.corpus_documents=3000", "model.embedded.steps=150", "model.max_length=96",
         "data.users_per_region=60", "federation.local_steps=2", "federation.batch_size=8"]
REGIONS = ("us", "sg")  # policies that allow a coordinator in the EU and cohorts of 2+


def federation(clients: int) -> list[str]:
    """`clients` nodes spread over the regions (at least 2 per region: their minimum cohorts)."""
    per_region = [clients // len(REGIONS) + (1 if i < clients % len(REGIONS) else 0) for i in range(len(REGIONS))]
    return [f"regions=[{','.join(REGIONS)}]"] + [f"regions.{r}.clients={n}" for r, n in zip(REGIONS, per_region)]


def model_sizes(overrides: list[str]) -> dict:
    from common.config import load_config
    from common.model.loading import load_base_model, resolve_model_path
    from common.model.lora import attach_lora
    import torch

    cfg = load_config(overrides)
    base = load_base_model(resolve_model_path(cfg.model, log=lambda m: None), torch.device("cpu"), torch.float32)
    full = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, cfg.model.lora, seed=0)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"full_model_bytes": 4 * full, "adapter_bytes": 4 * adapter}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "federation")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    clients = args.clients or ([4] if args.quick else [4, 6, 12])
    rounds = args.rounds or (1 if args.quick else 3)
    # The memorisation audit after the last round is not what is measured here.
    base = [*(MICRO if args.quick else []), f"federation.rounds={rounds}", "audit.enabled=false", *args.overrides]

    import os

    from common.config import CONFIG_DIR_ENV
    from server.compare import write_lab_policies
    from server.simulation import simulate

    work = args.out / "runs"
    # The presets require secure aggregation: the plain baseline runs on a lab copy of the policies.
    lab = write_lab_policies(args.out / "lab-configs", why="bench_federation: plaintext baseline",
                             require_secure_aggregation=False)
    os.environ[CONFIG_DIR_ENV] = str(lab.resolve())
    runs = []
    for n in clients:
        for secure in (True, False):
            run_dir = work / f"clients-{n}-{'secure' if secure else 'plain'}-{int(time.time())}"
            overrides = [*base, *federation(n), f"secure_aggregation.enabled={str(secure).lower()}",
                         f"workdir={work}", f"run_dir={run_dir}"]
            code = simulate(overrides, out=lambda line: None)
            if code != 0:
                print(f"run with {n} clients (secure={secure}) failed; see {run_dir}", file=sys.stderr)
                return 1
            rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            runs.append({"clients": n, "secure_aggregation": secure,
                         "round_s": statistics.median(r["seconds"] for r in rows),
                         "upload_bytes_per_client": statistics.median(r["upload_bytes_per_client"] for r in rows)})
    sizes = model_sizes(base)

    table = ["| clients | round s (secure) | round s (plain) | x | upload B/client (secure) | upload B/client (plain) | x |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["clients"], r["secure_aggregation"]): r for r in runs}
    ratios = {}
    for n in clients:
        s, p = by[(n, True)], by[(n, False)]
        ratios[n] = {"time": s["round_s"] / p["round_s"], "bytes": s["upload_bytes_per_client"] / p["upload_bytes_per_client"]}
        table.append(f"| {n} | {s['round_s']:.1f} | {p['round_s']:.1f} | {ratios[n]['time']:.2f} | "
                     f"{s['upload_bytes_per_client']:,.0f} | {p['upload_bytes_per_client']:,.0f} | {ratios[n]['bytes']:.3f} |")
    adapter_share = sizes["adapter_bytes"] / sizes["full_model_bytes"]
    lines = [f"Federation cost ({'quick' if args.quick else 'full'}; {device_name()}; "
             f"{rounds} round(s) each, median round)", "", *table, "",
             f"Adapter {sizes['adapter_bytes']:,} B vs full model {sizes['full_model_bytes']:,} B (float32): "
             f"{100 * adapter_share:.1f}% (goal <= 2%)"]
    record = {"benchmark": "federation", "quick": args.quick, "device": device_name(),
              "rounds": rounds, "runs": runs, "ratios": ratios, **sizes, "adapter_share": adapter_share}
    write_results(args.out, "federation", record, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
