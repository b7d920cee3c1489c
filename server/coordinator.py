"""The coordinator: plans rounds, collects adapter updates, averages them, keeps the run.

It talks to nodes through a Flower Grid (Message API) and never sees data, only adapter
updates and the fixed metrics of `common.wire`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from common.config import FedsovConfig
from common.errors import FederationError
from common.model.loading import load_base_model, model_fingerprint, resolve_model_path
from common.model.lora import adapter_state, attach_lora, save_adapter
from common.wire import (
    DESCRIBE,
    EVALUATE,
    GLOBAL_ADAPTER,
    METRICS,
    NODE,
    PLAN,
    TRAIN,
    UPDATE,
    RoundPlan,
    WireError,
    record_to_state,
    state_to_record,
)
from server.aggregation import apply_update, check_update, weighted_mean
from server.rundir import RunDirectory, json_number


@dataclass
class NodeInfo:
    node_id: int
    name: str
    region: str
    units: int
    epsilon: float
    status: str = "ready"
    refusals: list[str] = field(default_factory=list)


@dataclass
class Reply:
    node_id: int
    ok: bool
    reason: str = ""
    content: Any = None
    seconds: float = 0.0


class ServerModel:
    """The coordinator's copy of base model + LoRA: initial adapter and PEFT-format saving."""

    def __init__(self, cfg: FedsovConfig):
        self.path = resolve_model_path(cfg.model)
        self.fingerprint = model_fingerprint(self.path)
        base = load_base_model(self.path, torch.device("cpu"), torch.float32)
        self.peft_model = attach_lora(base, cfg.model.lora, cfg.federation.seed)

    def initial_state(self) -> "OrderedDict[str, torch.Tensor]":
        return adapter_state(self.peft_model)

    def save(self, state, out_dir: Path) -> None:
        save_adapter(self.peft_model, state, out_dir, self.path)


class Coordinator:
    def __init__(self, cfg: FedsovConfig, grid, run: RunDirectory, pull_interval: float = 0.2):
        self.cfg = cfg
        self.grid = grid
        self.run = run
        self.pull_interval = pull_interval
        self.nodes: dict[int, NodeInfo] = {}
        self.unavailable: list[str] = []

    # -- the run ---------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        started = time.time()
        model = ServerModel(cfg)
        state = model.initial_state()
        first_round = 1
        checkpoint = run.latest_checkpoint()
        if checkpoint is not None and not cfg.resume:
            raise FederationError(
                f"{run.path} already has checkpoints up to round {checkpoint.round}; a new run would mix with "
                f"them. Resume it with resume={run.path}, or use a new run_dir."
            )
        if checkpoint is not None:
            from safetensors.torch import load_file

            state = OrderedDict(load_file(str(checkpoint.path / "adapter_model.safetensors")))
            first_round = checkpoint.round + 1
            run.event("resumed", round=checkpoint.round, checkpoint=str(checkpoint.path))
        run.event("run_started", run_id=run.run_id, rounds=cfg.federation.rounds, first_round=first_round)

        self._discover(model.fingerprint)
        if first_round == 1:
            before = self._evaluate(0, state, model.fingerprint)
            run.metrics({"round": 0, "perplexity": before})
        for round_number in range(first_round, cfg.federation.rounds + 1):
            t0 = time.time()
            plan = self._plan(round_number, model.fingerprint)
            run.event("round_started", round=round_number, rounds=cfg.federation.rounds)
            state, train_row = self._train(plan, state)
            perplexity = self._evaluate(round_number, state, model.fingerprint)
            model_dir = run.save_checkpoint(
                round_number,
                lambda d: model.save(state, d),
                info={"run_id": run.run_id, "model_fingerprint": model.fingerprint},
                keep=cfg.federation.keep_checkpoints,
            )
            row = {"round": round_number, **train_row, "perplexity": perplexity, "seconds": round(time.time() - t0, 2)}
            run.metrics(row)
            run.event("round_finished", **row, checkpoint=str(model_dir))

        model.save(state, run.adapter_dir)
        summary = self._summary(started, model)
        run.write_summary(summary)
        run.event("run_finished", summary=str(run.summary_path))
        return summary

    # -- steps -------------------------------------------------------------------------------
    def _discover(self, fingerprint: str) -> None:
        expected = sum(r.clients for r in self.cfg.regions.values())
        deadline = time.monotonic() + self.cfg.federation.node_wait_timeout_s
        node_ids: list[int] = []
        while time.monotonic() < deadline:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= expected:
                break
            time.sleep(0.5)
        if not node_ids:
            raise FederationError(
                f"No node connected within {self.cfg.federation.node_wait_timeout_s:.0f}s "
                "(federation.node_wait_timeout_s). Start the regional clients, or raise the timeout."
            )
        if len(node_ids) < expected:
            self.run.event("nodes_missing", expected=expected, connected=len(node_ids))
        from flwr.app import ConfigRecord, RecordDict

        replies = self._exchange(
            node_ids, DESCRIBE, lambda _: RecordDict({"request": ConfigRecord({"run-id": self.run.run_id})}), 0
        )
        for reply in replies:
            if not reply.ok:
                self.unavailable.append(reply.reason)
                self.run.event("node_unavailable", node_id=reply.node_id, reason=reply.reason)
                continue
            info, metrics = reply.content[NODE], reply.content[METRICS]
            node = NodeInfo(reply.node_id, str(info["node-name"]), str(info["region"]), int(metrics["num-units"]), float(metrics["epsilon"]))
            self.nodes[reply.node_id] = node
            self.run.event(
                "node_joined", node=node.name, region=node.region, units=node.units,
                epsilon=json_number(node.epsilon), excluded_no_consent=int(metrics["excluded-no-consent"]),
            )
        if not self.nodes:
            raise FederationError("Every node refused or failed to describe itself; see events.jsonl for the reasons.")

    def _plan(self, round_number: int, fingerprint: str) -> RoundPlan:
        cfg = self.cfg
        lora, priv, fed = cfg.model.lora, cfg.privacy, cfg.federation
        return RoundPlan(
            run_id=self.run.run_id,
            round=round_number,
            total_rounds=fed.rounds,
            local_steps=fed.local_steps,
            batch_size=fed.batch_size,
            learning_rate=fed.learning_rate,
            max_length=cfg.model.max_length,
            eval_batch_size=fed.eval_batch_size,
            model_fingerprint=fingerprint,
            lora_rank=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            lora_ffa=lora.ffa,
            lora_seed=fed.seed,
            lora_target_modules=tuple(lora.target_modules or ()),
            dp_enabled=priv.enabled,
            max_grad_norm=priv.max_grad_norm,
            noise_multiplier=priv.noise_multiplier if priv.enabled else None,
            target_epsilon=priv.target_epsilon if priv.enabled else None,
        )

    def _train(self, plan: RoundPlan, state) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, Any]]:
        from flwr.app import RecordDict

        trainable = {k: v for k, v in state.items() if not (plan.lora_ffa and "lora_A" in k)}
        updates, weights = [], []
        losses: dict[str, list[tuple[float, int]]] = {}
        refused: list[str] = []

        def on_reply(reply: Reply) -> None:
            node = self.nodes[reply.node_id]
            if not reply.ok:
                node.refusals.append(f"round {plan.round}: {reply.reason}")
                refused.append(node.name)
                self.run.event("node_refused", round=plan.round, node=node.name, region=node.region, reason=reply.reason)
                return
            metrics = reply.content[METRICS]
            try:
                update = record_to_state(reply.content[UPDATE])
                check_update(update, trainable)
            except (WireError, KeyError) as err:
                refused.append(node.name)
                self.run.event("update_rejected", round=plan.round, node=node.name, region=node.region, reason=str(err))
                return
            units = int(metrics["num-units"])
            updates.append(update)
            weights.append(units)
            node.epsilon = float(metrics["epsilon"])
            losses.setdefault(node.region, []).append((float(metrics["train-loss"]), units))
            self.run.event(
                "node_trained", round=plan.round, node=node.name, region=node.region,
                loss=round(float(metrics["train-loss"]), 4), epsilon=json_number(node.epsilon),
                noise_multiplier=round(float(metrics["noise-multiplier"]), 4), seconds=round(reply.seconds, 2),
            )

        global_record = state_to_record(state)
        self._exchange(
            list(self.nodes),
            TRAIN,
            lambda _: RecordDict({PLAN: plan.to_record(), GLOBAL_ADAPTER: global_record}),
            plan.round,
            on_reply=on_reply,
        )
        aggregated = len(updates) >= self.cfg.federation.min_clients
        if aggregated:
            state = apply_update(state, weighted_mean(updates, weights), self.cfg.federation.server_learning_rate)
        else:
            self.run.event(
                "round_skipped", round=plan.round,
                reason=f"{len(updates)} update(s), fewer than federation.min_clients={self.cfg.federation.min_clients}; global adapter unchanged",
            )
        row = {
            "aggregated": aggregated,
            "clients_trained": len(updates),
            "clients_refused": refused,
            "train_loss": {r: sum(l * n for l, n in v) / sum(n for _, n in v) for r, v in losses.items()},
            "epsilon": self._region_epsilon(),
        }
        return state, row

    def _evaluate(self, round_number: int, state, fingerprint: str) -> dict[str, float]:
        from flwr.app import RecordDict

        plan = self._plan(max(round_number, 1), fingerprint)
        record = state_to_record(state)
        per_region: dict[str, list[float]] = {}
        for reply in self._exchange(
            list(self.nodes), EVALUATE, lambda _: RecordDict({PLAN: plan.to_record(), GLOBAL_ADAPTER: record}), round_number
        ):
            node = self.nodes[reply.node_id]
            if not reply.ok:
                self.run.event("evaluation_failed", round=round_number, node=node.name, reason=reply.reason)
                continue
            m = reply.content[METRICS]
            acc = per_region.setdefault(node.region, [0.0, 0.0])
            acc[0] += float(m["loss-sum"])
            acc[1] += float(m["tokens"])
        perplexity = {r: math.exp(s / t) for r, (s, t) in per_region.items() if t > 0}
        total_loss = sum(s for s, _ in per_region.values())
        total_tokens = sum(t for _, t in per_region.values())
        if total_tokens > 0:
            perplexity["overall"] = math.exp(total_loss / total_tokens)
        self.run.event("evaluated", round=round_number, perplexity=perplexity)
        return perplexity

    # -- messaging ---------------------------------------------------------------------------
    def _exchange(
        self,
        node_ids: Iterable[int],
        message_type: str,
        content_for: Callable[[int], Any],
        round_number: int,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> list[Reply]:
        """Send one message per node and collect replies as they arrive (until the timeout)."""
        from flwr.app import Message

        node_ids = list(node_ids)
        messages = [
            Message(content_for(n), dst_node_id=n, message_type=message_type, group_id=str(round_number))
            for n in node_ids
        ]
        sent = time.monotonic()
        pending = {mid: n for mid, n in zip(self.grid.push_messages(messages), node_ids)}
        deadline = sent + self.cfg.federation.round_timeout_s
        replies: list[Reply] = []
        while pending and time.monotonic() < deadline:
            for msg in self.grid.pull_messages(list(pending)):
                node_id = pending.pop(msg.metadata.reply_to_message_id, None)
                if node_id is None:
                    continue
                if msg.has_error():
                    reply = Reply(node_id, False, reason=msg.error.reason, seconds=time.monotonic() - sent)
                else:
                    reply = Reply(node_id, True, content=msg.content, seconds=time.monotonic() - sent)
                replies.append(reply)
                if on_reply:
                    on_reply(reply)
            if pending:
                time.sleep(self.pull_interval)
        for node_id in pending.values():
            reply = Reply(node_id, False, reason=f"no reply within federation.round_timeout_s={self.cfg.federation.round_timeout_s:.0f}s")
            replies.append(reply)
            if on_reply:
                on_reply(reply)
        return replies

    # -- reporting ---------------------------------------------------------------------------
    def _region_epsilon(self) -> dict[str, Any]:
        by_region: dict[str, float] = {}
        for node in self.nodes.values():
            by_region[node.region] = max(by_region.get(node.region, 0.0), node.epsilon)
        return {r: json_number(e) for r, e in by_region.items()}

    def _summary(self, started: float, model: ServerModel) -> dict[str, Any]:
        rows = self.run.read_metrics()
        before = next((r["perplexity"] for r in rows if r["round"] == 0), {})
        after = rows[-1]["perplexity"] if rows else {}
        regions: dict[str, Any] = {}
        epsilon = self._region_epsilon()
        for name in self.cfg.regions:
            members = [n for n in self.nodes.values() if n.region == name]
            regions[name] = {
                "nodes": [n.name for n in members],
                "perplexity_before": before.get(name),
                "perplexity_after": after.get(name),
                "epsilon": epsilon.get(name),
                "refusals": [f"{n.name}: {r}" for n in members for r in n.refusals],
            }
        return {
            "run_id": self.run.run_id,
            "status": "completed",
            "rounds_completed": rows[-1]["round"] if rows else 0,
            "seconds_this_session": round(time.time() - started, 1),
            "model": {"path": str(model.path), "fingerprint": model.fingerprint},
            "privacy": {
                "enabled": self.cfg.privacy.enabled,
                "delta": self.cfg.privacy.delta,
                "unit": self.cfg.privacy.unit.value,
                "epsilon_budget": self.cfg.privacy.epsilon_budget,
            },
            "regions": regions,
            "unavailable_nodes": self.unavailable,
            "overall": {"perplexity_before": before.get("overall"), "perplexity_after": after.get("overall")},
            "outputs": {
                "run_dir": str(self.run.path),
                "adapter": str(self.run.adapter_dir),
                "metrics": str(self.run.metrics_path),
                "config": str(self.run.config_path),
            },
        }
