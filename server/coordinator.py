"""The coordinator: plans rounds, collects adapter updates, averages them, keeps the run.

It talks to nodes through a Flower Grid (Message API) and never sees data, only adapter
updates and the fixed metrics of `common.wire`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from common.audit import AuditLog, EvidenceKey
from common.config import FederationConfig, FedsovConfig, LrScheduler
from common.errors import FederationError
from common.flowerproc import object_pulls_until
from common.model.loading import load_base_model, model_fingerprint, resolve_model_path
from common.model.lora import adapter_state, attach_lora, save_adapter
from common.schema import SchemaError, check_record
from common.secagg.crypto import SecAggError
from common.secagg.encoding import (
    Quantization,
    layout_of,
    read_metric_vector,
    unflatten,
    update_range,
)
from common.secagg.protocol import Advert
from common.wire import (
    AUDIT,
    DATA_COUNTS,
    DESCRIBE,
    EVALUATE,
    EVIDENCE,
    EVIDENCE_FIELDS,
    EXAMPLES,
    GLOBAL_ADAPTER,
    METRICS,
    NODE,
    PLAN,
    REFUSED,
    REQUEST,
    SECAGG_KEYS,
    TRAIN,
    UPDATE,
    RoundPlan,
    WireError,
    aggregation_tag,
    payload_bytes,
    plan_digest,
    record_to_state,
    state_to_record,
)
from server.aggregation import apply_update, check_update, weighted_mean
from server.anchors import AnchorStore
from server.planning import plan_regions
from server.provenance import write_manifest
from server.report import write_privacy_report
from server.rundir import RunDirectory, json_number
from server.secure import SecureRound, SecureSumResult, secure_sum, threshold_for


@dataclass
class NodeInfo:
    node_id: int
    name: str
    region: str
    units: int
    epsilon: float
    law: str
    policy_hash: str
    delta: float
    unit: str
    allowed_deployment: list[str]
    epsilon_budget: float
    refusals: list[str] = field(default_factory=list)
    rounds_contributed: int = 0
    data_counts: dict[str, int] = field(default_factory=dict)  # what its start checks found (describe metrics)


@dataclass
class Reply:
    node_id: int
    ok: bool
    reason: str = ""
    content: Any = None
    seconds: float = 0.0
    code: int | None = None  # the Error code of a failed reply; None when no reply came

    @property
    def refused(self) -> bool:
        """A node's own decision (policy, budget), as opposed to a node lost or failing."""
        return not self.ok and self.code == REFUSED


@dataclass
class NotContributing:
    """The nodes that did not contribute to a round: those that refused, and those that failed
    (no reply, node unavailable, an error). Only the first are refusals."""

    refused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def row(self) -> dict[str, list[str]]:
        return {"clients_refused": self.refused, "clients_failed": self.failed}


def round_learning_rate(fed: FederationConfig, round_number: int) -> float:
    """The clients' learning rate in a round: linear decay is Hugging Face's, sampled at each round's start
    (round r of R: learning_rate x (R - r + 1) / R), so the last round still moves."""
    if fed.lr_scheduler == LrScheduler.constant:
        return fed.learning_rate
    r = min(max(round_number, 1), fed.rounds)  # round 0's evaluation and the audit plan carry a rate they never use
    return fed.learning_rate * (fed.rounds - r + 1) / fed.rounds


def round_plan(cfg: FedsovConfig, run_id: str, round_number: int, fingerprint: str, cohort_size: int) -> RoundPlan:
    """What the coordinator asks of every node in one round, from the run's configuration."""
    lora, priv, fed = cfg.model.lora, cfg.privacy, cfg.federation
    return RoundPlan(
        run_id=run_id,
        round=round_number,
        total_rounds=fed.rounds,
        local_steps=fed.local_steps,
        batch_size=fed.batch_size,
        optimizer=fed.optimizer.value,
        learning_rate=round_learning_rate(fed, round_number),
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
        coordinator_jurisdiction=fed.coordinator_jurisdiction,
        cohort_size=cohort_size,
        secure_aggregation=cfg.secure_aggregation.enabled,
        noise_multiplier=priv.noise_multiplier if priv.enabled else None,
        target_epsilon=priv.target_epsilon if priv.enabled else None,
    )


class ServerModel:
    """The coordinator's copy of base model + LoRA: initial adapter and PEFT-format saving."""

    def __init__(self, cfg: FedsovConfig):
        self.path = resolve_model_path(cfg.model)
        self.fingerprint = model_fingerprint(self.path)
        base = load_base_model(self.path, torch.device("cpu"), torch.float32)
        self.peft_model = attach_lora(base, cfg.model.lora, cfg.federation.seed)

    def initial_state(self) -> OrderedDict[str, torch.Tensor]:
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
        key = EvidenceKey.load_or_create(run.coordinator_key_dir, logs=(run.path / "audit.jsonl",))
        self.audit = AuditLog(run.path / "audit.jsonl", actor="coordinator", key=key)
        self.anchors = AnchorStore(run.anchors_path)
        # Each start of the coordinator on a run is a session with its own id: nodes only ever see round numbers
        # move forward within one, and a resumed run re-running a round after a crash is a new session.
        session = 1 + sum(1 for e in self.audit.entries() if e["action"] == "run" and e["decision"] == "started")
        self.session_id = f"{run.run_id}#{session}"
        self.regions = plan_regions(cfg)
        self.upload_bytes: dict[int, int] = {}  # payload bytes each node sent this round

    # -- the run ---------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """The run: start (or resume), round 0's base evaluation, the rounds, then audit, report and manifest."""
        started = time.time()
        model = ServerModel(self.cfg)
        state, first_round = self._start(model)
        self._discover(model.fingerprint)
        if first_round == 1:
            self.run.metrics({"round": 0, "perplexity": self._evaluate(0, state, model.fingerprint)})
        for round_number in range(first_round, self.cfg.federation.rounds + 1):
            state = self._round(round_number, state, model)
        return self._finish(state, model, started)

    def _start(self, model: ServerModel) -> tuple[OrderedDict[str, torch.Tensor], int]:
        """The adapter to start from and the first round to run (a resumed run continues its checkpoint)."""
        cfg, run = self.cfg, self.run
        state, first_round = model.initial_state(), 1
        checkpoint = run.latest_checkpoint()
        if checkpoint is not None and not cfg.resume:
            raise FederationError(
                f"{run.path} already has checkpoints up to round {checkpoint.round}; a new run would mix with "
                f"them. Resume it with resume={run.path}, or use a new run_dir."
            )
        if checkpoint is not None and checkpoint.round >= cfg.federation.rounds:
            raise FederationError(
                f"{run.path} already finished round {checkpoint.round} of {cfg.federation.rounds}: nothing is left to "
                f"run. To train on, resume with federation.rounds greater than {checkpoint.round}."
            )
        if checkpoint is not None:
            from safetensors.torch import load_file

            state = OrderedDict(load_file(str(checkpoint.path / "adapter_model.safetensors")))
            first_round = checkpoint.round + 1
            run.event("resumed", round=checkpoint.round, checkpoint=str(checkpoint.path))
        run.event(
            "run_started",
            run_id=run.run_id,
            rounds=cfg.federation.rounds,
            first_round=first_round,
            secure_aggregation=cfg.secure_aggregation.enabled,
        )
        self.audit.record(
            "run",
            "started",
            reason=f"coordinator in {cfg.federation.coordinator_jurisdiction}; "
            f"regions planned: {', '.join(self.regions.included) or 'none'}",
            round=first_round,
            session=self.session_id,
        )
        if not cfg.secure_aggregation.enabled:
            run.event(
                "secure_aggregation_disabled",
                reason="secure_aggregation.enabled=false: the coordinator sees every client's update",
            )
        for region, why in self.regions.excluded.items():
            run.event("region_excluded", region=region, reason=why)
            self.audit.record("region", "excluded", reason=f"{region}: {why}")
        if not self.regions.included:
            raise FederationError("Every region's policy rules out this run; see the region_excluded events for why.")
        return state, first_round

    def _round(self, round_number: int, state, model: ServerModel) -> OrderedDict[str, torch.Tensor]:
        """Train, aggregate, evaluate, checkpoint and log one round."""
        cfg, run = self.cfg, self.run
        t0 = time.time()
        plan = self._plan(round_number, model.fingerprint)
        run.event("round_started", round=round_number, rounds=cfg.federation.rounds)
        self.upload_bytes = {}
        state, train_row = self._train(plan, state)
        train_row["upload_bytes_per_client"] = (
            round(sum(self.upload_bytes.values()) / len(self.upload_bytes)) if self.upload_bytes else 0
        )
        perplexity = self._evaluate(round_number, state, model.fingerprint)
        model_dir = run.save_checkpoint(
            round_number,
            lambda d: model.save(state, d),
            info={"run_id": run.run_id, "model_fingerprint": model.fingerprint},
            keep=cfg.federation.keep_checkpoints,
        )
        row = {"round": round_number, **train_row, "perplexity": perplexity, "seconds": round(time.time() - t0, 2)}
        run.metrics(row)
        self.audit.record(
            "round",
            "aggregated" if row["aggregated"] else "skipped",
            reason=f"{row['clients_trained']} client(s) aggregated; refused: "
            f"{', '.join(row['clients_refused']) or 'none'}; failed: {', '.join(row['clients_failed']) or 'none'}",
            round=round_number,
            bytes_received=sum(self.upload_bytes.values()),
            epsilon_by_region=row["epsilon"],
        )
        run.event("round_finished", **row, checkpoint=str(model_dir))
        return state

    def _finish(self, state, model: ServerModel, started: float) -> dict[str, Any]:
        """Save the adapter; the memorisation audit, summary, privacy report and provenance manifest."""
        cfg, run = self.cfg, self.run
        model.save(state, run.adapter_dir)
        if cfg.audit.enabled:
            run.write_audit_results(self._memorisation_audit(state, model.fingerprint))
        summary = self._summary(started, model)
        run.write_summary(summary)
        report = write_privacy_report(run, cfg)
        manifest = write_manifest(run.adapter_dir, self._manifest(model, report))
        self.audit.record(
            "adapter", "saved", reason=f"final adapter with provenance manifest {manifest}", round=cfg.federation.rounds
        )
        run.event(
            "report_written", report=str(run.report_dir / "privacy-report.html"), violations=report["bound_violations"]
        )
        if report["bound_violations"]:
            raise FederationError(
                "PRIVACY AUDIT FAILED: an empirical epsilon lower bound exceeds the accounted epsilon ("
                + "; ".join(report["bound_violations"])
                + "). The accounting or the training is wrong; do not "
                f"use this model. See {run.report_dir / 'privacy-report.html'}."
            )
        run.event("run_finished", summary=str(run.summary_path), result=summary)
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

        request = ConfigRecord(
            {"run-id": self.session_id, "coordinator-jurisdiction": self.cfg.federation.coordinator_jurisdiction}
        )
        replies = self._exchange(node_ids, DESCRIBE, lambda _: RecordDict({REQUEST: request}), 0)
        for reply in replies:
            if not reply.ok:
                self.unavailable.append(reply.reason)
                self.run.event("node_unavailable", node_id=reply.node_id, reason=reply.reason)
                self.audit.record("node", "unavailable", reason=reply.reason)
                continue
            info, metrics = reply.content[NODE], reply.content[METRICS]
            node = NodeInfo(
                reply.node_id,
                str(info["node-name"]),
                str(info["region"]),
                int(metrics["num-units"]),
                float(metrics["epsilon"]),
                law=str(info["law"]),
                policy_hash=str(info["policy-hash"]),
                delta=float(metrics["delta"]),
                unit=str(info["unit"]),
                allowed_deployment=[str(j) for j in info["allowed-deployment"]],
                epsilon_budget=float(metrics["epsilon-budget"]),
                data_counts={k: int(metrics[k]) for k in DATA_COUNTS},
            )
            if node.region in self.regions.excluded or node.region not in self.regions.included:
                why = self.regions.excluded.get(node.region, f"region '{node.region}' is not in this run's config")
                self.run.event("node_excluded", node=node.name, region=node.region, reason=why)
                continue
            if not self._evidence_follows_anchor(node, reply.content):
                continue
            if node.policy_hash != self.regions.included[node.region]:
                # The node's own policy governs; the coordinator's copy was only for planning.
                self.run.event(
                    "policy_mismatch",
                    node=node.name,
                    region=node.region,
                    node_policy=node.policy_hash,
                    coordinator_copy=self.regions.included[node.region],
                )
            self.nodes[reply.node_id] = node
            self.audit.record(
                "node",
                "joined",
                reason=f"{node.name} ({node.region}, {node.law})",
                policy_hash=node.policy_hash,
                epsilon=node.epsilon,
            )
            self.run.event(
                "node_joined",
                node=node.name,
                region=node.region,
                units=node.units,
                epsilon=json_number(node.epsilon),
                people=int(metrics["people"]),
                excluded_no_consent=int(metrics["excluded-no-consent"]),
                excluded_special=int(metrics["excluded-special"]),
                law=node.law,
            )
        if not self.nodes:
            raise FederationError("Every node refused or failed to describe itself; see events.jsonl for the reasons.")

    def _evidence_follows_anchor(self, node: NodeInfo, content) -> bool:
        """A node whose ledger or audit log lost what it reported in an earlier run takes no part."""
        try:
            evidence = check_record(content[EVIDENCE], EVIDENCE_FIELDS, "evidence")
        except (KeyError, SchemaError) as err:
            why = f"its reply carries no valid evidence heads ({err})"
        else:
            why = self.anchors.problem(node.name, evidence)
            if why is None:
                self.anchors.record(node.name, node.region, evidence, self.session_id)
                return True
        self.unavailable.append(f"{node.name}: evidence check failed: {why}")
        self.run.event("node_evidence_failed", node=node.name, region=node.region, reason=why)
        self.audit.record("node", "excluded", reason=f"{node.name}: {why}; its privacy budget cannot be trusted")
        return False

    def _record_evidence(self, node: NodeInfo, content, round_number: int) -> None:
        """Keep the heads a node reports after training as the anchor for later runs."""
        try:
            evidence = check_record(content[EVIDENCE], EVIDENCE_FIELDS, "evidence")
        except (KeyError, SchemaError) as err:
            self.run.event("node_evidence_failed", node=node.name, region=node.region, reason=str(err))
            return
        self.anchors.record(node.name, node.region, evidence, self.session_id)
        self.audit.record(
            "evidence",
            "anchored",
            reason=f"{node.name}: ledger at entry {evidence['ledger-entries']}",
            round=round_number,
            node=node.name,
            **{k.replace("-", "_"): v for k, v in evidence.items()},
        )

    def _train_request(self, plan: RoundPlan, global_record):
        """The round's train message for one node: plan, global adapter and the node's ledger anchor."""
        from flwr.app import ConfigRecord, RecordDict

        plan_record = plan.to_record()

        def request(node_id: int):
            content = {PLAN: plan_record, GLOBAL_ADAPTER: global_record}
            anchor = self.anchors.ledger_anchor(self.nodes[node_id].name)
            if anchor is not None:
                content[REQUEST] = ConfigRecord(anchor)
            return RecordDict(content)

        return request

    def _plan(self, round_number: int, fingerprint: str) -> RoundPlan:
        return round_plan(self.cfg, self.session_id, round_number, fingerprint, len(self.nodes))

    def _train(self, plan: RoundPlan, state) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:

        request = self._train_request(plan, state_to_record(state))
        trainable = OrderedDict((k, v) for k, v in state.items() if not (plan.lora_ffa and "lora_A" in k))
        if plan.secure_aggregation:
            return self._train_secure(plan, state, trainable, request)
        updates, weights = [], []
        losses: dict[str, list[tuple[float, int]]] = {}
        missing = NotContributing()

        def on_reply(reply: Reply) -> None:
            node = self.nodes[reply.node_id]
            if not reply.ok:
                self._not_contributing(plan.round, node, reply, missing)
                return
            metrics = reply.content[METRICS]
            try:
                update = record_to_state(reply.content[UPDATE])
                check_update(update, trainable)
            except (WireError, KeyError) as err:
                missing.failed.append(node.name)
                self.run.event("update_rejected", round=plan.round, node=node.name, region=node.region, reason=str(err))
                return
            units = int(metrics["num-units"])
            self._record_evidence(node, reply.content, plan.round)
            updates.append(update)
            weights.append(units)
            node.epsilon = float(metrics["epsilon"])
            node.rounds_contributed += 1
            losses.setdefault(node.region, []).append((float(metrics["train-loss"]), units))
            self.run.event(
                "node_trained",
                round=plan.round,
                node=node.name,
                region=node.region,
                loss=round(float(metrics["train-loss"]), 4),
                epsilon=json_number(node.epsilon),
                seconds=round(reply.seconds, 2),
                units=units,
            )

        self._exchange(list(self.nodes), TRAIN, request, plan.round, on_reply=on_reply)
        row: dict[str, Any] = {"secure_aggregation": False, "clients_trained": len(updates), **missing.row()}
        if len(updates) >= self.cfg.federation.min_clients:
            state = apply_update(state, weighted_mean(updates, weights), self.cfg.federation.server_learning_rate)
            row["aggregated"] = True
            row["train_loss"] = {r: sum(loss * n for loss, n in v) / sum(n for _, n in v) for r, v in losses.items()}
        else:
            self._skip(
                plan.round,
                f"{len(updates)} update(s), fewer than federation.min_clients={self.cfg.federation.min_clients}",
                row,
            )
        row["epsilon"] = self._region_epsilon()
        return state, row

    def _train_secure(
        self, plan: RoundPlan, state, trainable, request
    ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
        """Stage 1 rides on the train message; the update is only ever seen summed."""
        adverts, units, missing = self._advertise(plan.round, TRAIN, request)
        row: dict[str, Any] = {"secure_aggregation": True, "clients_trained": 0, **missing.row()}
        try:
            layout = layout_of(trainable)
            quantization = Quantization.for_cohort(
                update_range(plan.optimizer, plan.learning_rate, plan.local_steps, plan.max_grad_norm),
                sum(units.values()),
            )
            params = {
                "layout": [[name, list(shape)] for name, shape in layout],
                "clip-range": quantization.clip_range,
                "levels": quantization.levels,
            }
            result = self._secure_sum(plan, TRAIN, adverts, params, sum(math.prod(shape) for _, shape in layout))
            weight = sum(units[n] for n in result.survivors)
            per_slot, clipped = read_metric_vector("train", result.slots, result.total.metrics)
            per_slot = {slot: v for slot, v in per_slot.items() if slot in result.revealed}
            units_summed = round(sum(v["units"] for v in per_slot.values()))
            if units_summed > weight or (len(result.revealed) == len(result.slots) and units_summed != weight):
                raise SecAggError("The securely summed unit counts disagree with the survivors' declared counts.")
        except SecAggError as err:
            self._skip(plan.round, f"secure aggregation failed: {err}", row)
            row["epsilon"] = self._region_epsilon()
            return state, row
        mean = unflatten(quantization.decode(result.total.data, weight), layout)
        for n in result.survivors:
            self.nodes[n].rounds_contributed += 1
        state = apply_update(state, mean, self.cfg.federation.server_learning_rate)
        row.update(
            aggregated=True,
            clients_trained=len(result.survivors),
            clients_dropped=[self.nodes[n].name for n in result.dropped],
            train_loss={r: v["loss-x-units"] / v["units"] for r, v in per_slot.items() if v["units"] > 0},
            clipped_values=int(clipped),
            quantization_step=quantization.step,
            epsilon=self._region_epsilon(),
        )
        return state, row

    def _secure_sum(
        self, plan: RoundPlan, category: str, adverts: dict[int, Advert], params: dict[str, Any], n_data: int
    ) -> SecureSumResult:
        """Stages 2-5 for one secure sum, with a threshold every participating node accepts."""
        sa = self.cfg.secure_aggregation
        if len(adverts) < sa.min_clients:
            raise SecAggError(
                f"{len(adverts)} client(s) took part, fewer than secure_aggregation.min_clients={sa.min_clients}"
            )
        regions = {n: self.nodes[n].region for n in adverts}
        cohort = max(self.cfg.regions[r].policy.transfers.min_cohort for r in regions.values())
        threshold = threshold_for(len(adverts), sa.threshold_fraction, cohort)
        if threshold > len(adverts):
            raise SecAggError(f"{len(adverts)} client(s) took part; the threshold every node requires is {threshold}")
        return secure_sum(
            self._stage_exchange(plan.round),
            SecureRound(
                category,
                aggregation_tag(plan.run_id, plan.round, category),
                adverts,
                regions,
                threshold,
                plan_digest(plan.to_record()),
                params,
                n_data,
                sa.stage_timeout_s,
            ),
        )

    def _advertise(
        self, round_number: int, message_type: str, request
    ) -> tuple[dict[int, Advert], dict[int, int], NotContributing]:
        """Send the round's train/evaluate message; collect the nodes' signed public keys (stage 1)."""
        adverts: dict[int, Advert] = {}
        units: dict[int, int] = {}
        missing = NotContributing()

        def on_reply(reply: Reply) -> None:
            node = self.nodes[reply.node_id]
            if not reply.ok and message_type == EVALUATE:
                # Not a refusal of the round: a node evaluates only rounds it trained in (and round 0).
                self.run.event(
                    "node_not_evaluating", round=round_number, node=node.name, region=node.region, reason=reply.reason
                )
                return
            if not reply.ok:
                self._not_contributing(round_number, node, reply, missing)
                return
            k = reply.content[SECAGG_KEYS]
            adverts[reply.node_id] = Advert(reply.node_id, str(k["name"]), k["c-pk"], k["s-pk"], k["signature"])
            if METRICS in reply.content:  # train: unit count and epsilon are all that travel in the clear
                self._record_evidence(node, reply.content, round_number)
                metrics = reply.content[METRICS]
                units[reply.node_id] = int(metrics["num-units"])
                node.epsilon = float(metrics["epsilon"])
                self.run.event(
                    "node_trained",
                    round=round_number,
                    node=node.name,
                    region=node.region,
                    loss=None,
                    epsilon=json_number(node.epsilon),
                    seconds=round(reply.seconds, 2),
                    units=units[reply.node_id],
                )

        self._exchange(list(self.nodes), message_type, request, round_number, on_reply=on_reply)
        return adverts, units, missing

    def _stage_exchange(self, round_number: int):
        def exchange(node_ids, message_type, content_for, timeout):
            return self._exchange(node_ids, message_type, content_for, round_number, timeout=timeout)

        return exchange

    def _not_contributing(self, round_number: int, node: NodeInfo, reply: Reply, missing: NotContributing) -> None:
        if reply.refused:
            node.refusals.append(f"round {round_number}: {reply.reason}")
            missing.refused.append(node.name)
            self.run.event("node_refused", round=round_number, node=node.name, region=node.region, reason=reply.reason)
        else:
            missing.failed.append(node.name)
            self.run.event("node_failed", round=round_number, node=node.name, region=node.region, reason=reply.reason)

    def _skip(self, round_number: int, reason: str, row: dict[str, Any]) -> None:
        row["aggregated"] = False
        self.run.event("round_skipped", round=round_number, reason=f"{reason}; global adapter unchanged")

    def _evaluate(self, round_number: int, state, fingerprint: str) -> dict[str, float]:
        from flwr.app import RecordDict

        plan = self._plan(round_number, fingerprint)
        record = state_to_record(state)
        request = lambda _: RecordDict({PLAN: plan.to_record(), GLOBAL_ADAPTER: record})  # noqa: E731
        sums: dict[str, list[float]] = {}
        if plan.secure_aggregation:
            adverts, _, _ = self._advertise(round_number, EVALUATE, request)
            try:
                result = self._secure_sum(plan, EVALUATE, adverts, {}, 0)
            except SecAggError as err:
                self.run.event("evaluation_failed", round=round_number, reason=str(err))
                return {}
            per_slot, _ = read_metric_vector("evaluate", result.slots, result.total.metrics)
            sums = {r: [v["loss-sum"], v["tokens"]] for r, v in per_slot.items() if r in result.revealed}
        else:
            for reply in self._exchange(list(self.nodes), EVALUATE, request, round_number):
                node = self.nodes[reply.node_id]
                if not reply.ok:
                    self.run.event("evaluation_failed", round=round_number, node=node.name, reason=reply.reason)
                    continue
                m = reply.content[METRICS]
                acc = sums.setdefault(node.region, [0.0, 0.0])
                acc[0] += float(m["loss-sum"])
                acc[1] += float(m["tokens"])
        perplexity = {r: math.exp(s / t) for r, (s, t) in sums.items() if t > 0}
        total_loss = sum(s for s, _ in sums.values())
        total_tokens = sum(t for _, t in sums.values())
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
        timeout: float | None = None,
    ) -> list[Reply]:
        """Send one message per node and collect replies as they arrive (until the timeout)."""
        from flwr.app import Message

        node_ids = list(node_ids)
        messages = [
            Message(content_for(n), dst_node_id=n, message_type=message_type, group_id=str(round_number))
            for n in node_ids
        ]
        sent = time.monotonic()
        # Flower returns the ids in the messages' order, an empty one for a message it could not push, and none
        # at all when the request was too large: a message without an id is not awaited (its node never replies).
        pushed = self.grid.push_messages(messages)
        pending = {mid: n for mid, n in zip(pushed, node_ids, strict=False) if mid}
        timeout = self.cfg.federation.round_timeout_s if timeout is None else timeout
        deadline = sent + timeout
        replies: list[Reply] = []
        while pending and time.monotonic() < deadline:
            with object_pulls_until(deadline):
                pulled = self.grid.pull_messages(list(pending))
            for msg in pulled:
                node_id = pending.pop(msg.metadata.reply_to_message_id, None)
                if node_id is None:
                    continue
                if msg.has_error():
                    reply = Reply(
                        node_id, False, reason=msg.error.reason, seconds=time.monotonic() - sent, code=msg.error.code
                    )
                else:
                    reply = Reply(node_id, True, content=msg.content, seconds=time.monotonic() - sent)
                    self.upload_bytes[node_id] = self.upload_bytes.get(node_id, 0) + payload_bytes(msg.content)
                replies.append(reply)
                if on_reply:
                    on_reply(reply)
            if pending:
                time.sleep(self.pull_interval)
        for node_id in pending.values():
            reply = Reply(node_id, False, reason=f"no reply to {message_type} within {timeout:.0f}s")
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

    def _memorisation_audit(self, state, fingerprint: str) -> dict[str, Any]:
        """Each node audits the final model on its own canaries and records; numbers come back."""
        from flwr.app import ConfigRecord, RecordDict

        plan = self._plan(self.cfg.federation.rounds, fingerprint)
        record = state_to_record(state)
        request = ConfigRecord({"coordinator-jurisdiction": self.cfg.federation.coordinator_jurisdiction})
        results: dict[str, Any] = {}
        self.run.event("audit_started", nodes=len(self.nodes))
        for reply in self._exchange(
            list(self.nodes),
            AUDIT,
            lambda _: RecordDict({PLAN: plan.to_record(), GLOBAL_ADAPTER: record, REQUEST: request}),
            plan.round,
        ):
            node = self.nodes[reply.node_id]
            if not reply.ok:
                self.run.event("audit_failed", node=node.name, reason=reply.reason)
                results[node.name] = {"region": node.region, "error": reply.reason}
                continue
            metrics = {k: json_number(float(v)) for k, v in reply.content[METRICS].items()}
            results[node.name] = {
                "region": node.region,
                "metrics": metrics,
                "examples": list(reply.content[EXAMPLES]["examples"]),
            }
            self.run.event("audit_node", node=node.name, region=node.region, metrics=metrics)
        self.audit.record(
            "memorisation_audit", "collected", reason=f"{len(results)} node(s) reported", round=plan.round
        )
        return results

    def _manifest(self, model: ServerModel, report: dict[str, Any]) -> dict[str, Any]:
        """Provenance of the adapter, from what each node reported of its own policy."""
        contributing: dict[str, Any] = {}
        for node in self.nodes.values():
            if node.rounds_contributed == 0:
                continue
            entry = contributing.setdefault(
                node.region,
                {
                    "law": node.law,
                    "policy_hashes": [],
                    "epsilon": 0.0,
                    "delta": node.delta,
                    "unit": node.unit,
                    "rounds_contributed": 0,
                    "allowed_deployment": node.allowed_deployment,
                    "nodes": [],
                },
            )
            entry["nodes"].append(node.name)
            if node.policy_hash not in entry["policy_hashes"]:
                entry["policy_hashes"].append(node.policy_hash)
            entry["epsilon"] = json_number(max(float(entry["epsilon"]), node.epsilon))
            entry["rounds_contributed"] = max(entry["rounds_contributed"], node.rounds_contributed)
            if set(node.allowed_deployment) != set(entry["allowed_deployment"]):
                entry["allowed_deployment"] = sorted(set(entry["allowed_deployment"]) & set(node.allowed_deployment))
        rows = self.run.read_metrics()
        return {
            "format": "fedsov-manifest/1",
            "run_id": self.run.run_id,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": {"path": str(model.path), "fingerprint": model.fingerprint},
            "coordinator_jurisdiction": self.cfg.federation.coordinator_jurisdiction,
            "rounds_completed": rows[-1]["round"] if rows else 0,
            "secure_aggregation": self.cfg.secure_aggregation.enabled,
            "dp": self.cfg.privacy.enabled,
            "contributing_regions": contributing,
            "excluded_regions": self.regions.excluded,
            "audit": {region: r["verdict"] for region, r in report["regions"].items()},
            "privacy_report": str(self.run.report_dir / "privacy-report.html"),
            # Each node's ledger and audit-log heads at the end of the run: `fedsov audit verify --manifest`
            # checks a node's files against them.
            "evidence_anchors": self.anchors.snapshot([n.name for n in self.nodes.values()]),
        }

    def _not_contributing_regions(self, regions: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
        """Every way this run fell short of its plan, one line each naming who and why (with the node's reason)."""
        lines = []
        for name, region in regions.items():
            if not region["nodes"]:
                lines.append(
                    f"region {name}: no node of it took part"
                    + "".join(f"; {why}" for why in self.unavailable if f"(region {name})" in why)
                )
                continue
            for node, count in region["rounds_contributed"].items():
                if count == 0:
                    reasons = [r for r in region["refusals"] if r.startswith(f"{node}: ")]
                    lines.append(
                        f"node {node} (region {name}) contributed to no round"
                        + (f": {reasons[-1].split(': ', 1)[1]}" if reasons else "")
                    )
        # A node of a region the plan already excluded (its policy refuses this run, said before round 1) is
        # the plan, not a shortfall.
        lines += [
            f"a node did not take part: {why}"
            for why in self.unavailable
            if not any(f"(region {r})" in why for r in [*regions, *self.regions.excluded])
        ]
        lines += [f"round {r['round']} was not aggregated" for r in rows if r["round"] > 0 and not r.get("aggregated")]
        return lines

    def _summary(self, started: float, model: ServerModel) -> dict[str, Any]:
        rows = self.run.read_metrics()
        before = next((r["perplexity"] for r in rows if r["round"] == 0), {})
        after = rows[-1]["perplexity"] if rows else {}
        regions: dict[str, Any] = {}
        epsilon = self._region_epsilon()
        for name in self.regions.included:
            members = [n for n in self.nodes.values() if n.region == name]
            first = members[0] if members else None
            contributed = sum(n.rounds_contributed for n in members)
            regions[name] = {
                "contributed": contributed > 0,
                "rounds_contributed": {n.name: n.rounds_contributed for n in members},
                "data": {n.name: n.data_counts for n in members},
                "law": first.law if first else None,
                "policy_hash": first.policy_hash if first else None,
                "delta": first.delta if first else None,
                "unit": first.unit if first else None,
                "epsilon_budget": first.epsilon_budget if first else None,
                "nodes": [n.name for n in members],
                "perplexity_before": before.get(name),
                "perplexity_after": after.get(name),
                "epsilon": epsilon.get(name),
                "refusals": [f"{n.name}: {r}" for n in members for r in n.refusals],
            }
        missing = self._not_contributing_regions(regions, rows)
        return {
            "run_id": self.run.run_id,
            # partial: some planned region, node or round contributed nothing (launchers exit non-zero unless
            # federation.allow_partial); `not_contributing` says who and why.
            "status": "partial" if missing else "completed",
            "not_contributing": missing,
            "allow_partial": self.cfg.federation.allow_partial,
            "rounds_completed": rows[-1]["round"] if rows else 0,
            "seconds_this_session": round(time.time() - started, 1),
            "model": {"path": str(model.path), "fingerprint": model.fingerprint},
            "secure_aggregation": self.cfg.secure_aggregation.enabled,
            "privacy": {"enabled": self.cfg.privacy.enabled},
            "regions": regions,
            "coordinator_jurisdiction": self.cfg.federation.coordinator_jurisdiction,
            "excluded_regions": self.regions.excluded,
            "unavailable_nodes": self.unavailable,
            "overall": {"perplexity_before": before.get("overall"), "perplexity_after": after.get("overall")},
            "outputs": {
                "run_dir": str(self.run.path),
                "adapter": str(self.run.adapter_dir),
                "metrics": str(self.run.metrics_path),
                "config": str(self.run.config_path),
            },
        }
