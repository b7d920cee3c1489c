"""A federation in one process, for sweeps: the regions' real nodes and the coordinator's arithmetic.

Each client is a `client.node.RegionNode` (its policy file, privacy ledger, PLD accountant, DP training and
held-out evaluation, exactly as under Flower); the coordinator's part is its round plan (`round_plan`), and
the secure sum's arithmetic: every update quantised into the range the optimiser's bound sets, summed modulo
2**32, decoded and applied (`Quantization`, `update_range`, `apply_update`), values outside the range clipped
and counted. What is left out is Flower, Ray and the masking protocol: masks cancel in the sum, so the model
a run ends with is the one `fedsov simulate` would reach with the same random draws. A sweep arm here costs
its training and evaluation only, which is what lets a benchmark try dozens of settings.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def policies_from(config_dir: Path) -> Iterator[None]:
    """Nodes read their policy files from $FEDSOV_CONFIG_DIR, as in a simulation."""
    from common.config import CONFIG_DIR_ENV

    previous = os.environ.get(CONFIG_DIR_ENV)
    os.environ[CONFIG_DIR_ENV] = str(config_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CONFIG_DIR_ENV, None)
        else:
            os.environ[CONFIG_DIR_ENV] = previous


def secure_mean(state, updates: Sequence[tuple[dict, int]], plan) -> tuple[dict, int, float]:
    """(the mean update as the secure sum decodes it, values clipped to its range, quantisation step)."""
    from common.secagg.encoding import Quantization, flatten, layout_of, unflatten, update_range

    layout = layout_of(updates[0][0])
    total_weight = sum(w for _, w in updates)
    q = Quantization.for_cohort(
        update_range(plan.optimizer, plan.learning_rate, plan.local_steps, plan.max_grad_norm), total_weight
    )
    total = np.zeros(sum(math.prod(shape) for _, shape in layout), dtype=np.uint32)
    clipped = 0
    for update, weight in updates:
        encoded, over = q.encode(flatten(update, layout), weight)
        total += encoded  # uint32 wraps around: the sum is modulo 2**32, as the masked sum is
        clipped += over
    return unflatten(q.decode(total, total_weight), layout), clipped, q.step


def run_federation(
    root: Path,
    name: str,
    overrides: Sequence[str],
    policies: Path,
    *,
    state_from: Path | None = None,
    evaluate_base: bool = False,
    evaluate_every: bool = True,
    after: Callable[[list, object, dict], dict] | None = None,
    out: Callable[[str], None] = print,
) -> dict:
    """One arm: a fresh federation in `root/name` on the shared data in `root/data`; returns its numbers.

    `state_from` (an earlier arm's folder) lends its nodes' canaries and data-use caches, so every arm trains
    on the same units without scrubbing them again; ledgers, keys and audit logs are always new. Held-out
    perplexity after every round, or (evaluate_every=False) after the last only, which saves the time. `after(nodes,
    last plan, final adapter)` runs on the trained federation (e.g. each node's memorisation audit); what it
    returns joins the result.
    """
    from client.node import RegionNode
    from client.settings import simulation_settings
    from common.config import load_config
    from common.data.prepare import ensure_synthetic_data
    from server.aggregation import apply_update
    from server.coordinator import ServerModel, round_plan
    from server.planning import plan_regions

    workdir = root / name
    if workdir.exists():
        shutil.rmtree(workdir)
    cfg = load_config([*overrides, f"workdir={workdir}", f"data.root={root / 'data'}"], config_dir=policies)
    excluded = plan_regions(cfg).excluded
    if excluded:
        raise RuntimeError(f"arm {name}: regions excluded by their policies: {excluded}")
    ensure_synthetic_data(cfg, log=out)
    if state_from is not None:
        _lend_node_state(state_from / "nodes", workdir / "nodes")
    with policies_from(policies):
        nodes = [RegionNode(simulation_settings(cfg, i)) for i in range(sum(r.clients for r in cfg.regions.values()))]
    server = ServerModel(cfg)
    state = server.initial_state()
    run_id = f"lab-{name}"
    rows = []
    started = time.time()
    if evaluate_base:
        rows.append({"round": 0, **_evaluate(nodes, round_plan(cfg, run_id, 0, server.fingerprint, len(nodes)), state)})
    for r in range(1, cfg.federation.rounds + 1):
        plan = round_plan(cfg, run_id, r, server.fingerprint, len(nodes))
        outcomes = [node.train_round(plan, state) for node in nodes]
        mean, clipped, step = secure_mean(state, [(o.update, int(o.metrics["num-units"])) for o in outcomes], plan)
        state = apply_update(state, mean, cfg.federation.server_learning_rate)
        evaluated = _evaluate(nodes, plan, state) if evaluate_every or r == cfg.federation.rounds else {}
        rows.append(
            {
                "round": r,
                **evaluated,
                "clipped_values": clipped,
                "quantization_step": step,
                "train_loss": sum(float(o.metrics["train-loss"]) for o in outcomes) / len(outcomes),
                "epsilon": {n.settings.name: float(o.metrics["epsilon"]) for n, o in zip(nodes, outcomes, strict=True)},
                "noise_multiplier": {
                    n.settings.name: float(o.metrics["noise-multiplier"]) for n, o in zip(nodes, outcomes, strict=True)
                },
                "units": {n.settings.name: int(o.metrics["num-units"]) for n, o in zip(nodes, outcomes, strict=True)},
                "seconds": round(time.time() - started, 1),
            }
        )
        perplexity = f"perplexity {evaluated['perplexity']['overall']:.2f}, " if evaluated else ""
        out(
            f"  {name} round {r}: {perplexity}epsilon {max(rows[-1]['epsilon'].values()):.2f}, "
            f"{rows[-1]['seconds']:.0f} s"
        )
    result = {
        "arm": name,
        "rounds": rows,
        "seconds": round(time.time() - started, 1),
        "parameters": sum(v.numel() for v in mean.values()),
    }
    return {**result, **(after(nodes, plan, state) if after else {})}


def _evaluate(nodes, plan, state) -> dict:
    sums: dict[str, list[float]] = {}
    for node in nodes:
        m = node.evaluate(plan, state)
        acc = sums.setdefault(node.settings.region, [0.0, 0.0])
        acc[0] += float(m["loss-sum"])
        acc[1] += float(m["tokens"])
    perplexity = {r: math.exp(s / t) for r, (s, t) in sums.items()}
    perplexity["overall"] = math.exp(sum(s for s, _ in sums.values()) / sum(t for _, t in sums.values()))
    return {"perplexity": perplexity}


def _lend_node_state(source_nodes: Path, target_nodes: Path) -> None:
    from common.leakage.canaries import CANARY_FILE

    for node in source_nodes.iterdir():
        target = target_nodes / node.name
        target.mkdir(parents=True, exist_ok=True)
        if (node / CANARY_FILE).exists():
            shutil.copy2(node / CANARY_FILE, target / CANARY_FILE)
        if (node / "cache").is_dir():
            shutil.copytree(node / "cache", target / "cache", dirs_exist_ok=True)
