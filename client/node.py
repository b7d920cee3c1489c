"""A regional node: its own data, policy, privacy ledger and audit log, and the rounds it agrees to run.

Plain Python (no Flower), so tests drive it directly; `client.app` is the Flower glue. The
policy comes from the node's own file, never from the coordinator: every request is checked
against it before anything is computed, and each decision goes to the node's audit log.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from client.nodedata import load_node_data
from client.training import DpSettings, heldout_loss, train_locally
from common.audit import TamperedLog
from common.config import LoraSettings, ModelConfig, load_region_file
from common.errors import FedsovError, LedgerError, ModelError, PrivacyError
from common.model.loading import load_base_model, load_tokenizer, model_fingerprint, pick_device, pick_dtype, resolve_model_path
from common.model.lora import attach_lora, load_adapter_state
from common.policy import (
    PlanTerms,
    PolicyViolation,
    check_plan,
    coordinator_allowed,
    effective_noise,
    policy_hash,
)
from common.privacy.accounting import DpSgdSteps, noise_for_target
from common.privacy.ledger import PrivacyLedger
from common.wire import RoundPlan

# Re-exported: settings live in a light module so light messages need not import torch.
from client.settings import AUDIT_FILE, LEDGER_FILE, NodeSettings, PolicyGate, deployment_settings, node_audit, simulation_settings  # noqa: E402,F401

@dataclass
class TrainOutcome:
    update: Mapping[str, torch.Tensor]
    metrics: dict[str, float | int]


class RegionNode:
    """Starting a node runs every start check; any failure refuses the node as a whole."""

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.audit = node_audit(settings)
        self.policy_hash: str | None = None
        try:
            region = load_region_file(settings.policy_file)
            self.policy = region.policy
            self.policy_hash = policy_hash(self.policy)
            if region.name != settings.region:
                raise PolicyViolation(
                    f"Node {settings.name} declares region '{settings.region}' but its policy file "
                    f"{settings.policy_file} is for region '{region.name}'. Point the node at its own region's policy."
                )
            torch.set_num_threads(max(1, settings.threads))
            self._ledger = self._open_ledger()
            self._model_path = resolve_model_path(settings.model)
            self._tokenizer = load_tokenizer(self._model_path)
            self.data = load_node_data(settings, self.policy, self._tokenizer)
        except FedsovError as err:
            try:
                self.audit.record("start", "refused", reason=f"{type(err).__name__}: {err}", policy_hash=self.policy_hash)
            except TamperedLog:
                pass  # a tampered audit log is itself the reason the node will not start
            raise
        self.audit.record("start", "accepted", reason=f"{self.policy.law} policy checks passed: {self.data.counts}",
                          policy_hash=self.policy_hash)

    # -- start checks ---------------------------------------------------------------------
    def _open_ledger(self) -> PrivacyLedger:
        path = self.settings.state_dir / LEDGER_FILE
        charged = sum(1 for e in self.audit.entries() if e["action"] == "ledger_charge")
        if charged and not path.exists():
            raise LedgerError(
                f"The privacy ledger {path} is missing, but this node's audit log records {charged} charge(s). "
                "Training is refused: restore the ledger (and its .head file) from a backup."
            )
        p = self.policy.privacy
        return PrivacyLedger(path, delta=p.delta, unit=p.unit)

    # -- protocol ---------------------------------------------------------------------------
    def check_coordinator(self, jurisdiction: str, round_number: int | None = None) -> None:
        """A region whose policy forbids the coordinator's jurisdiction shares nothing at all."""
        ok, why = coordinator_allowed(self.policy, jurisdiction)
        if not ok:
            self.audit.record("transfer", "refused", reason=why, round=round_number, policy_hash=self.policy_hash)
            raise PolicyViolation(why)

    def describe(self, coordinator_jurisdiction: str) -> tuple[dict[str, Any], dict[str, float | int]]:
        self.check_coordinator(coordinator_jurisdiction)
        fingerprint = self._ledger.register(self.data.train_units)
        c = self.data.counts
        p = self.policy
        return (
            {
                "region": self.settings.region,
                "node-name": self.settings.name,
                "law": p.law,
                "policy-hash": self.policy_hash,
                "unit": p.privacy.unit.value,
                "allowed-deployment": list(p.retention.allowed_deployment_jurisdictions),
            },
            {
                "num-units": c["train_units"],
                "records": c["records"],
                "excluded-no-consent": c["excluded_no_consent"],
                "excluded-special": c["excluded_special"] + c["excluded_fields"],
                "heldout-records": c["heldout_records"],
                "delta": p.privacy.delta,
                "epsilon-budget": p.privacy.epsilon_budget,
                "epsilon": self._ledger.spent(fingerprint),
            },
        )

    def train_round(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> TrainOutcome:
        """Check the plan against this node's policy and budget, train with DP, charge the ledger."""
        decision = self._check_plan(plan, plan.dp_enabled)
        data = self.data
        n_units = len(data.train_units)
        sample_rate = plan.batch_size / n_units
        if sample_rate >= 1:
            self._refuse(plan, f"federation.batch_size={plan.batch_size} is not below the {n_units} privacy units "
                               f"on node {self.settings.name}: Poisson sampling needs rate < 1")
        fingerprint = self._ledger.register(data.train_units)
        privacy = self.policy.privacy
        dp = None
        adjustments = list(decision.adjustments)
        if plan.dp_enabled:
            sigma = plan.noise_multiplier
            if sigma is None:
                if plan.target_epsilon is None:
                    self._refuse(plan, "the plan enables DP but sets neither noise_multiplier nor target_epsilon")
                sigma = noise_for_target(plan.target_epsilon, privacy.delta, sample_rate, plan.local_steps * plan.total_rounds)
            sigma, raised = effective_noise(self.policy, sigma)
            if raised:
                adjustments.append(raised)
            dp = DpSettings(noise_multiplier=sigma, max_grad_norm=decision.max_grad_norm)
            planned = DpSgdSteps(sigma, sample_rate, plan.local_steps)
            try:
                projected = self._ledger.check_budget(fingerprint, planned, privacy.epsilon_budget)
            except PrivacyError as err:
                self.audit.record("plan", "refused", reason=str(err), round=plan.round, policy_hash=self.policy_hash,
                                  epsilon=self._ledger.spent(fingerprint))
                raise
        else:
            planned = DpSgdSteps(0.0, sample_rate, plan.local_steps)
            projected = float("inf")
        self.audit.record("plan", "adjusted" if adjustments else "accepted",
                          reason="; ".join(adjustments) or f"plan within the {self.policy.law} policy",
                          round=plan.round, policy_hash=self.policy_hash, epsilon=projected,
                          noise_multiplier=planned.noise_multiplier, max_grad_norm=decision.max_grad_norm)

        model = self._prepared_model(plan, global_state)
        result = train_locally(
            model,
            data.train_examples,
            steps=plan.local_steps,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            dp=dp,
            pad_id=self._tokenizer.pad_token_id,
        )
        # Charged before the reply leaves: a crash after training over-counts, never under-counts.
        charge = self._ledger.charge(
            fingerprint, planned, budget=privacy.epsilon_budget if plan.dp_enabled else None,
            run_id=plan.run_id, round_number=plan.round,
        )
        entries, head = self._ledger.head
        self.audit.record("ledger_charge", "recorded", reason=f"{planned.steps} steps at sigma {planned.noise_multiplier:.3g}",
                          round=plan.round, policy_hash=self.policy_hash, epsilon=charge.epsilon_after,
                          ledger_entries=entries, ledger_head=head)
        return TrainOutcome(
            update=result.update,
            metrics={
                "num-units": n_units,
                "train-loss": result.mean_loss,
                "epsilon": charge.epsilon_after,
                "noise-multiplier": planned.noise_multiplier,
                "sample-rate": sample_rate,
                "steps": result.steps,
            },
        )

    def evaluate(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> dict[str, float | int]:
        # Evaluation trains nothing (DP is not at stake) but its losses still leave the node.
        self._check_plan(plan, dp_enabled=True)
        model = self._prepared_model(plan, global_state)
        loss_sum, tokens = heldout_loss(
            model, self.data.heldout_examples, batch_size=plan.eval_batch_size, pad_id=self._tokenizer.pad_token_id
        )
        return {"loss-sum": loss_sum, "tokens": tokens, "num-examples": len(self.data.heldout_examples)}

    def memorisation_audit(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, float], list[str]]:
        """Audit the final model here, on this node's canaries and records; only numbers leave."""
        from client.memorisation import audit

        self.check_coordinator(plan.coordinator_jurisdiction, plan.round)
        model = self._prepared_model(plan, global_state)
        metrics, examples = audit(
            model, self._tokenizer, canaries=self.data.canaries, members=self.data.record_examples,
            nonmembers=self.data.heldout_examples, train_raw_texts=self.data.train_raw_texts, settings=self.settings.audit,
        )
        fingerprint = self._ledger.register(self.data.train_units)
        metrics.update(epsilon=self._ledger.spent(fingerprint), delta=self.policy.privacy.delta)
        self.audit.record("memorisation_audit", "completed", reason="audit numbers computed on this node",
                          round=plan.round, policy_hash=self.policy_hash, epsilon=metrics["epsilon"])
        return metrics, examples

    def check_cohort(self, size: int, stage: str, round_number: int | None) -> None:
        PolicyGate.check_cohort(self, size, stage, round_number)  # same rule, node already has policy + audit

    def _check_plan(self, plan: RoundPlan, dp_enabled: bool):
        decision = check_plan(
            self.policy,
            PlanTerms(plan.coordinator_jurisdiction, dp_enabled, plan.max_grad_norm, plan.secure_aggregation, plan.cohort_size),
        )
        if not decision.accepted:
            self._refuse(plan, decision.explain())
        return decision

    def _refuse(self, plan: RoundPlan, why: str) -> None:
        self.audit.record("plan", "refused", reason=why, round=plan.round, policy_hash=self.policy_hash)
        raise PolicyViolation(f"{self.settings.name} refuses round {plan.round}: {why}")

    def _prepared_model(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]):
        fingerprint = cached_fingerprint(self._model_path)
        if plan.model_fingerprint != fingerprint:
            raise ModelError(
                f"The coordinator's base model ({plan.model_fingerprint[:12]}) differs from this node's "
                f"({fingerprint[:12]} at {self._model_path}). Both must use the same base model."
            )
        lora = LoraSettings(
            rank=plan.lora_rank,
            alpha=plan.lora_alpha,
            dropout=plan.lora_dropout,
            target_modules=list(plan.lora_target_modules) or None,
            ffa=plan.lora_ffa,
        )
        model = cached_peft_model(self._model_path, self.settings.model, lora, plan.lora_seed)
        load_adapter_state(model, global_state)
        return model


# Ray actors and deployment processes serve many messages: keep the prepared model around.
_CACHE_LOCK = threading.Lock()
_MODELS: dict[tuple, Any] = {}
_FINGERPRINTS: dict[tuple, str] = {}


def cached_fingerprint(path: Path) -> str:
    key = (str(path), tuple((f.name, f.stat().st_mtime_ns) for f in sorted(path.iterdir())))
    with _CACHE_LOCK:
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = model_fingerprint(path)
        return _FINGERPRINTS[key]


def cached_peft_model(path: Path, model_cfg: ModelConfig, lora: LoraSettings, seed: int):
    device = pick_device(model_cfg.device)
    dtype = pick_dtype(model_cfg.dtype, device)
    key = (str(path), str(device), str(dtype), repr(lora), seed)
    with _CACHE_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one prepared model per process: a different setup replaces it
            base = load_base_model(path, device, dtype)
            _MODELS[key] = attach_lora(base, lora, seed)
        return _MODELS[key]
