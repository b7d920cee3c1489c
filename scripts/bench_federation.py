#!/usr/bin/env python3
"""Communication, secure-aggregation cost and scale, measured on simulated federations (`fedsov simulate`).

For each client count, the same federation runs with and without secure aggregation (or only the
modes given); from each run's metrics.jsonl it takes the round time (median over rounds) and the
bytes each client uploaded per round, and from the models themselves the adapter and full-model
sizes (float32). It reports the growth of round time per added client and where it bends. Ratios
are within this one run on this machine.

    .venv/bin/python scripts/bench_federation.py --clients 4 6 12 --rounds 2            # secure vs plain
    .venv/bin/python scripts/bench_federation.py --clients 3 6 12 24 48 --rounds 2 --modes secure \
        --out bench/scale                                                                # scale curve
    .venv/bin/python scripts/bench_federation.py --quick              # smoke: 4 clients, micro model, 1 round
    .venv/bin/python scripts/bench_federation.py --deployed [--quick]  # deployed vs simulated rounds, one script run

`--deployed` runs one federation twice, with `fedsov deploy local` (a coordinator and one SuperNode per
client as separate processes, TLS and node authentication, each node's warm worker) and with `fedsov
simulate`, and compares each round's time. One node per region (eu, us, sg): eu's policy needs a cohort
of 3 and us/sg's a cohort of 2, so three nodes in one aggregation suit every policy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MICRO, device_name, write_results  # noqa: E402  (scripts/ is on sys.path when run)

QUICK = [*MICRO, "model.max_length=96", "federation.local_steps=2", "federation.batch_size=8"]
# The default federation's share: 300 users per region over 2 clients.
USERS_PER_CLIENT = {"quick": 30, "full": 150}
# Growth per added client counts as bent where a segment's slope exceeds the first segment's by this factor.
BEND_FACTOR = 1.5
REGIONS = ("us", "sg")  # policies that allow a coordinator in the EU and cohorts of 2+
DEPLOYED_FEDERATION = ["regions=[eu,us,sg]", "regions.eu.clients=1", "regions.us.clients=1", "regions.sg.clients=1"]
DEPLOYED_GOAL = 1.2  # a deployed round at most this many times the same round simulated


def federation(clients: int, users_per_client: int) -> list[str]:
    """`clients` nodes spread over the regions (at least 2 per region: their minimum cohorts), each
    with the same amount of data whatever the count, so that every client does the same work (with a
    fixed data set, more clients would mean smaller shards, cheaper evaluation, and nodes refusing
    to train once their shard has fewer privacy units than the batch size)."""
    per_region = [clients // len(REGIONS) + (1 if i < clients % len(REGIONS) else 0) for i in range(len(REGIONS))]
    return [f"regions=[{','.join(REGIONS)}]", f"data.users_per_region={users_per_client * max(per_region)}"] + [
        f"regions.{r}.clients={n}" for r, n in zip(REGIONS, per_region, strict=True)
    ]


def model_sizes(overrides: list[str]) -> dict:
    """float32 bytes of the full model and of what a client uploads (the trainable adapter), for the
    configured model and LoRA, and for reference: attention-only LoRA on the same model, and the same
    LoRA on a GPT-2 small shape (124M, random init on the meta device: counts only, nothing downloaded)."""
    import dataclasses

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.config import LoraSettings, load_config
    from common.model.loading import load_base_model, resolve_model_path
    from common.model.lora import attach_lora

    cfg = load_config(overrides)
    c = cfg.model.lora
    lora = LoraSettings(
        rank=c.rank,
        alpha=c.alpha,
        dropout=c.dropout,
        ffa=c.ffa,
        target_modules=list(c.target_modules) if c.target_modules else None,
    )

    def sizes(make_base, settings: LoraSettings) -> dict:
        base = make_base()
        full = sum(p.numel() for p in base.parameters())
        adapter = sum(p.numel() for p in attach_lora(base, settings, seed=0).parameters() if p.requires_grad)
        return {"full_model_bytes": 4 * full, "adapter_bytes": 4 * adapter, "share": adapter / full}

    def configured():
        return load_base_model(resolve_model_path(cfg.model, log=lambda m: None), torch.device("cpu"), torch.float32)

    def gpt2_small():
        with torch.device("meta"):
            return GPT2LMHeadModel(GPT2Config())

    attention_only = dataclasses.replace(lora, target_modules=["c_attn"])
    return {
        "configured": sizes(configured, lora),
        "configured, LoRA on c_attn only": sizes(configured, attention_only),
        "GPT-2 small shape (124M), same LoRA": sizes(gpt2_small, lora),
    }


def growth(points: list[tuple[int, float]]) -> dict:
    """Seconds per added client: least-squares over all points, per segment, and the first segment
    (if any) whose slope exceeds BEND_FACTOR x the first one's."""
    points = sorted(points)
    if len(points) < 2:
        return {"per_client_s": None, "segments": [], "bends_after": None}
    xs, ys = zip(*points, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    segments = [
        {"from": a[0], "to": b[0], "per_client_s": (b[1] - a[1]) / (b[0] - a[0])} for a, b in itertools.pairwise(points)
    ]
    first = segments[0]["per_client_s"]
    bend = next((s["from"] for s in segments[1:] if first > 0 and s["per_client_s"] > BEND_FACTOR * first), None)
    return {"per_client_s": slope, "segments": segments, "bends_after": bend}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=("secure", "plain"), default=["secure", "plain"])
    parser.add_argument("--deployed", action="store_true", help="deployed (fedsov deploy local) vs simulated rounds")
    parser.add_argument("--out", type=Path, default=None, help="default bench/federation (bench/deployment)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.deployed:
        return deployed_vs_simulated(args.out or ROOT / "bench" / "deployment", args.quick, args.rounds, args.overrides)
    args.out = args.out or ROOT / "bench" / "federation"
    clients = sorted(set(args.clients or ([4] if args.quick else [4, 6, 12])))
    if clients[0] < 2 * len(REGIONS):
        parser.error(f"--clients: at least {2 * len(REGIONS)} (each of {', '.join(REGIONS)} needs a cohort of 2)")
    rounds = args.rounds or (1 if args.quick else 3)
    # The memorisation audit after the last round is not what is measured here.
    base = [*(QUICK if args.quick else []), f"federation.rounds={rounds}", "audit.enabled=false", *args.overrides]

    import os

    from common.config import CONFIG_DIR_ENV
    from server.compare import write_lab_policies
    from server.simulation import simulate

    work = args.out / "runs"
    # The presets require secure aggregation: the plain baseline runs on a lab copy of the policies.
    lab = write_lab_policies(
        args.out / "lab-configs", why="bench_federation: plaintext baseline", require_secure_aggregation=False
    )
    os.environ[CONFIG_DIR_ENV] = str(lab.resolve())
    runs = []
    for n in clients:
        for mode in args.modes:
            name = f"clients-{n}-{mode}-{int(time.time())}"
            # Each run its own node state: ledgers must not carry spend from one measurement to the next.
            overrides = [
                *base,
                *federation(n, USERS_PER_CLIENT["quick" if args.quick else "full"]),
                f"secure_aggregation.enabled={str(mode == 'secure').lower()}",
                f"workdir={work / name}",
                f"data.root={work / 'data'}",
                f"run_dir={work / name / 'run'}",
            ]
            run_dir = work / name / "run"
            code = simulate(overrides, out=lambda line: None)
            if code != 0:
                print(f"run with {n} clients ({mode}) failed; see {run_dir}", file=sys.stderr)
                return 1
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            trained = min(r["clients_trained"] for r in rows)
            if trained < n:
                # A round time with clients missing measures a smaller federation: say so, loudly.
                print(
                    f"WARNING: with {n} clients ({mode}) only {trained} trained in some round; see {run_dir}",
                    file=sys.stderr,
                )
            runs.append(
                {
                    "clients": n,
                    "secure_aggregation": mode == "secure",
                    "min_clients_trained": trained,
                    "round_s": statistics.median(r["seconds"] for r in rows),
                    "upload_bytes_per_client": statistics.median(r["upload_bytes_per_client"] for r in rows),
                }
            )
            print(f"{n} clients, {mode}: {runs[-1]['round_s']:.1f} s/round", flush=True)
    sizes = model_sizes(base)

    by = {(r["clients"], "secure" if r["secure_aggregation"] else "plain"): r for r in runs}
    table = [
        "| clients | "
        + " | ".join(f"round s ({m})" for m in args.modes)
        + " | "
        + " | ".join(f"upload B/client ({m})" for m in args.modes)
        + (" | time x | bytes x |" if len(args.modes) == 2 else " |"),
        "|---" * (1 + 2 * len(args.modes) + (2 if len(args.modes) == 2 else 0)) + "|",
    ]
    ratios = {}
    for n in clients:
        row = [
            str(n),
            *(
                f"{by[(n, m)]['round_s']:.1f}"
                + (
                    ""
                    if by[(n, m)]["min_clients_trained"] == n
                    else f" (only {by[(n, m)]['min_clients_trained']} trained)"
                )
                for m in args.modes
            ),
            *(f"{by[(n, m)]['upload_bytes_per_client']:,.0f}" for m in args.modes),
        ]
        if len(args.modes) == 2:
            s, p = by[(n, "secure")], by[(n, "plain")]
            ratios[n] = {
                "time": s["round_s"] / p["round_s"],
                "bytes": s["upload_bytes_per_client"] / p["upload_bytes_per_client"],
            }
            row += [f"{ratios[n]['time']:.2f}", f"{ratios[n]['bytes']:.3f}"]
        table.append("| " + " | ".join(row) + " |")
    scale = {m: growth([(n, by[(n, m)]["round_s"]) for n in clients]) for m in args.modes}
    lines = [
        f"Federation cost ({'quick' if args.quick else 'full'}; {device_name()}; {rounds} round(s) each, median round)",
        "",
        *table,
    ]
    for m, g in scale.items():
        if g["per_client_s"] is not None:
            segs = ", ".join(f"{s['from']}->{s['to']}: {s['per_client_s']:.2f}" for s in g["segments"])
            bend = f"bends after {g['bends_after']} clients" if g["bends_after"] else "no bend in this range"
            lines += [
                "",
                f"Round time ({m}) grows {g['per_client_s']:.2f} s per added client (segments {segs}); {bend}.",
            ]
    lines += ["", "| model, LoRA | adapter B (float32) | full model B | adapter share |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {v['adapter_bytes']:,} | {v['full_model_bytes']:,} | {100 * v['share']:.2f}% |"
        for name, v in sizes.items()
    ]
    lines += [
        "",
        f"Goal: adapter <= 2% of the full model on the default: "
        f"{'met' if sizes['configured']['share'] <= 0.02 else 'MISSED'}",
    ]
    record = {
        "benchmark": "federation",
        "quick": args.quick,
        "device": device_name(),
        "rounds": rounds,
        "modes": args.modes,
        "runs": runs,
        "ratios": ratios,
        "scale": scale,
        "sizes": sizes,
        "adapter_bytes": sizes["configured"]["adapter_bytes"],
        "full_model_bytes": sizes["configured"]["full_model_bytes"],
        "adapter_share": sizes["configured"]["share"],
    }
    write_results(args.out, "federation", record, lines, plot=lambda fig: plot_rounds(fig, clients, args.modes, by))
    return 0


def deployed_vs_simulated(out: Path, quick: bool, rounds: int | None, extra: list[str]) -> int:
    """Each round's seconds under `fedsov deploy local` (TLS, node authentication) and `fedsov simulate`."""
    from server.deployment import LocalDeployment
    from server.simulation import simulate

    rounds = rounds or (1 if quick else 2)
    base = [
        *(QUICK if quick else []),
        *DEPLOYED_FEDERATION,
        f"federation.rounds={rounds}",
        "audit.enabled=false",
        *extra,
    ]
    work = out / "runs"
    stamp = int(time.time())
    rows: dict[str, list[dict]] = {}
    for mode in ("deployed", "simulated"):
        name = f"{mode}-{stamp}"
        # Each run its own node state (ledgers start empty in both); the same data for both.
        overrides = [*base, f"workdir={work / name}", f"data.root={work / 'data'}", f"run_dir={work / name / 'run'}"]
        if mode == "deployed":
            with LocalDeployment(overrides, out=lambda line: None) as deployment:
                code, run_dir = deployment.run(), deployment.run_dir
        else:
            code, run_dir = simulate(overrides, out=lambda line: None), work / name / "run"
        if code != 0:
            print(f"the {mode} run failed; see {run_dir}", file=sys.stderr)
            return 1
        rows[mode] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
        print(f"{mode}: " + ", ".join(f"round {r['round']} {r['seconds']:.1f} s" for r in rows[mode]), flush=True)
    per_round = [
        {
            "round": d["round"],
            "deployed_s": d["seconds"],
            "simulated_s": m["seconds"],
            "ratio": d["seconds"] / m["seconds"],
            "clients_trained": [d["clients_trained"], m["clients_trained"]],
        }
        # A run that stopped early has fewer rounds: compare the rounds both completed.
        for d, m in zip(rows["deployed"], rows["simulated"], strict=False)
    ]
    ratio = statistics.median(r["ratio"] for r in per_round)
    lines = [
        f"Deployed vs simulated rounds ({'quick' if quick else 'full'}; {device_name()}; {rounds} round(s); "
        "eu, us, sg x 1 client; TLS and node authentication on)",
        "",
        "| round | deployed s | simulated s | x | clients trained (deployed, simulated) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['round']} | {r['deployed_s']:.1f} | {r['simulated_s']:.1f} | {r['ratio']:.2f} | "
        f"{r['clients_trained'][0]}, {r['clients_trained'][1]} |"
        for r in per_round
    ]
    lines += [
        "",
        f"Goal: a deployed round <= {DEPLOYED_GOAL}x the simulated one: median {ratio:.2f}x, "
        f"{'met' if ratio <= DEPLOYED_GOAL else 'MISSED'}",
    ]
    record = {
        "benchmark": "deployed-vs-simulated",
        "quick": quick,
        "device": device_name(),
        "rounds": rounds,
        "federation": DEPLOYED_FEDERATION,
        "per_round": per_round,
        "median_ratio": ratio,
        "goal": DEPLOYED_GOAL,
    }
    write_results(out, "deployment", record, lines)
    return 0


def plot_rounds(figure, clients: list[int], modes: list[str], by: dict) -> None:
    """Round time and upload bytes per client against the number of clients, per mode."""
    for i, (key, title) in enumerate(
        (("round_s", "round time (s)"), ("upload_bytes_per_client", "upload per client (B)"))
    ):
        ax = figure.add_subplot(1, 2, i + 1)
        for m in modes:
            ax.plot(clients, [by[(n, m)][key] for n in clients], marker="o", label=m)
        ax.set_xlabel("clients")
        ax.set_title(title)
        ax.legend()


if __name__ == "__main__":
    sys.exit(main())
