"""A regional node: its own data, policy, privacy ledger and audit log, and the rounds it agrees to run.

Plain Python (no Flower), so tests drive it directly; `client.app` is the Flower glue. The
policy comes from the node's own file, never from the coordinator: every request is checked
against it before anything is computed, and each decision goes to the node's audit log.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from client.erasure import ErasureRegister, check_register
from client.nodedata import NodeData, load_node_data
from client.retention import enforce_node_retention

# Re-exported: settings live in a light module so light messages need not import torch.
from client.settings import (  # noqa: F401  (re-exported)
    AUDIT_FILE,
    LEDGER_FILE,
    NodeSettings,
    PolicyGate,
    deployment_settings,
    node_audit,
    simulation_settings,
)
from client.training import DpSettings, heldout_loss, train_locally
from client.transfers import TransferScope, TransferVolume, check_scope
from common.audit import EvidenceKey, HashChainLog, TamperedLog
from common.config import LoraSettings, ModelConfig, load_region_file
from common.errors import FedsovError, LedgerError, ModelError, PrivacyError
from common.model.loading import (
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    pick_dtype,
    resolve_model_path,
)
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
from common.wire import RoundPlan, adapter_digest


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
            self._model_path = resolve_model_path(settings.model)
            self._tokenizer = load_tokenizer(self._model_path)
            # Erasures before the data, which they filter; data before the ledger: a refusal found in the data
            # (e.g. delta above 1/N) must not leave a new ledger behind.
            self._erasures = ErasureRegister(settings.ledger_dir, settings.ledger_key_dir)
            check_register(self._erasures, self.audit.entries())
            self.data = self._load_data()
            self._ledger = self._open_ledger()
            scope = TransferScope(settings.ledger_dir, self._ledger_key)
            check_scope(scope, self.audit.entries())
            self.transfers = TransferVolume(self.policy, settings.coordinator_jurisdiction, scope)
            enforce_node_retention(settings, self.policy, self.audit)
        except FedsovError as err:
            try:
                self.audit.record(
                    "start", "refused", reason=f"{type(err).__name__}: {err}", policy_hash=self.policy_hash
                )
            except TamperedLog:
                pass  # a tampered audit log is itself the reason the node will not start
            raise
        self.audit.record(
            "start",
            "accepted",
            reason=f"{self.policy.law} policy checks passed: {self.data.counts}",
            policy_hash=self.policy_hash,
        )
        STARTS["node"] += 1

    # -- start checks ---------------------------------------------------------------------
    def _open_ledger(self) -> PrivacyLedger:
        """The ledger, checked against the last head this node's own audit log recorded for it."""
        path = self.settings.ledger_dir / LEDGER_FILE
        charges = [e for e in self.audit.entries() if e["action"] == "ledger_charge"]
        if charges and not HashChainLog.files_exist(path):
            raise LedgerError(
                f"The privacy ledger {path} is missing, but this node's audit log records {len(charges)} charge(s). "
                "Training is refused: restore the ledger (and its .head file) from a backup."
            )
        p = self.policy.privacy
        key = self._ledger_key = EvidenceKey.load_or_create(self.settings.ledger_key_dir, logs=(path,))
        ledger = PrivacyLedger(path, delta=p.delta, unit=p.unit, key=key)
        if charges:  # a ledger replaced by a fresh one (e.g. started again by a sibling node) fails here
            ledger.check_anchor(int(charges[-1]["ledger_entries"]), str(charges[-1]["ledger_head"]))
        return ledger

    def _load_data(self) -> NodeData:
        """The node's data without the people whose erasure was requested (as of the register's current head)."""
        self._erasures_seen = self._erasures.current_head()
        return load_node_data(self.settings, self.policy, self._tokenizer, erased=self._erasures.matcher())

    def _refresh_data(self) -> None:
        """A node kept running reloads its data when an erasure was recorded since: the person leaves at once."""
        check_register(self._erasures, self.audit.entries())
        if self._erasures.current_head() != self._erasures_seen:
            self.data = self._load_data()
            self.audit.record(
                "data",
                "reloaded",
                reason=f"the erasure register changed: {self.data.counts}",
                policy_hash=self.policy_hash,
            )

    def _note_transfer(self, plan: RoundPlan) -> None:
        """Before a release leaves, count its people in the period's transfer scope (volume rules, abroad only).

        Decided again here, not only before the work: a sibling node's release may have moved the period's count
        into a band whose safeguard is not recorded.
        """
        details = {
            "jurisdiction": self.transfers.jurisdiction,
            "run_id": plan.run_id,
            "round": plan.round,
            "node": self.settings.name,
        }
        decision, added, added_sensitive = self.transfers.record(self.data.people, self.data.sensitive_people, details)
        if not decision.allowed:
            self._refuse(plan, decision.reason)
        if added or added_sensitive:
            head = self.transfers.scope.head
            self.audit.record(
                "transfer_scope",
                "recorded",
                reason=decision.reason,
                round=plan.round,
                run_id=plan.run_id,
                policy_hash=self.policy_hash,
                people_added=added,
                sensitive_added=added_sensitive,
                scope_entries=head.entries,
                scope_head=head.head,
                safeguard=decision.as_dict(),
            )

    # -- protocol ---------------------------------------------------------------------------
    def check_coordinator(self, declared: str, round_number: int | None = None) -> None:
        """The coordinator is where this node's pins say, whatever it declares; the policy decides on that."""
        pinned = self.settings.coordinator_jurisdiction
        if declared != pinned:
            why = (
                f"the coordinator declares jurisdiction {declared!r}, but this node's pins place it in {pinned!r} "
                "(coordinators.yaml in the node's config folder): a coordinator cannot choose its own jurisdiction"
            )
        else:
            ok, why = coordinator_allowed(self.policy, pinned)
            if ok:
                decision = self.transfers.decision(self.data.people, self.data.sensitive_people)
                if decision.allowed:
                    return
                why = decision.reason
        self.audit.record("transfer", "refused", reason=why, round=round_number, policy_hash=self.policy_hash)
        raise PolicyViolation(why)

    def evidence(self) -> dict[str, Any]:
        """This node's ledger and audit-log heads: the coordinator keeps them as anchors for the next run."""
        ledger, audit = self._ledger.head, self.audit.chain.chain_head()
        return {
            "ledger-genesis": ledger.genesis,
            "ledger-entries": ledger.entries,
            "ledger-head": ledger.head,
            "audit-genesis": audit.genesis,
            "audit-entries": audit.entries,
            "audit-head": audit.head,
        }

    def check_anchor(self, anchor: Mapping[str, Any] | None, round_number: int) -> None:
        """A ledger that lost what a coordinator saw in an earlier run (reset, rolled back, rewritten) trains
        nothing."""
        if anchor is None:
            return
        try:
            if anchor["ledger-genesis"] != self._ledger.head.genesis:
                raise LedgerError(
                    f"Privacy ledger {self._ledger.path} is not the ledger this node reported before (its first entry "
                    "differs from the anchor the coordinator kept): it was deleted or replaced. Training is refused: "
                    "restore the ledger and its .head file from a backup."
                )
            self._ledger.check_anchor(int(anchor["ledger-entries"]), str(anchor["ledger-head"]))
        except LedgerError as err:
            self.audit.record("ledger", "refused", reason=str(err), round=round_number, policy_hash=self.policy_hash)
            raise

    def describe(self, coordinator_jurisdiction: str) -> tuple[dict[str, Any], dict[str, float | int]]:
        self._refresh_data()
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
                "people": c["people"],
                "records": c["records"],
                "excluded-no-consent": c["excluded_no_consent"],
                "excluded-special": c["excluded_special"] + c["excluded_fields"],
                "heldout-records": c["heldout_records"],
                "skipped-files": c["skipped_files"],
                "truncated-units": c["truncated_units"],
                "truncated-tokens": c["truncated_tokens"],
                "truncated-heldout": c["truncated_heldout"],
                "delta": p.privacy.delta,
                "epsilon-budget": p.privacy.epsilon_budget,
                "epsilon": self._ledger.spent(fingerprint),
            },
        )

    def train_round(
        self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor], anchor: Mapping[str, Any] | None = None
    ) -> TrainOutcome:
        """Check the plan against this node's policy and budget, train with DP, charge what ran."""
        self.check_anchor(anchor, plan.round)
        self._refresh_data()
        decision = self._check_plan(plan, plan.dp_enabled)
        self._check_round_moves_forward(plan)
        if plan.optimizer == "rmsprop" and not plan.dp_enabled:
            # After the policy's own checks, so that a region requiring DP says so first.
            self._refuse(
                plan, "optimizer 'rmsprop' starts from the DP noise's variance and the plan has no DP; use adamw"
            )
        n_units = len(self.data.train_units)
        sample_rate = plan.batch_size / n_units
        if sample_rate >= 1:
            self._refuse(
                plan,
                f"federation.batch_size={plan.batch_size} is not below the {n_units} privacy units "
                f"on node {self.settings.name}: Poisson sampling needs rate < 1",
            )
        fingerprint = self._ledger.register(self.data.train_units)
        dp, planned, projected, adjustments = self._dp_terms(plan, decision, fingerprint, sample_rate)
        self.audit.record(
            "plan",
            "adjusted" if adjustments else "accepted",
            reason="; ".join(adjustments) or f"plan within the {self.policy.law} policy",
            round=plan.round,
            run_id=plan.run_id,
            policy_hash=self.policy_hash,
            epsilon=projected,
            noise_multiplier=planned.noise_multiplier,
            max_grad_norm=decision.max_grad_norm,
        )

        model = self._prepared_model(plan, global_state)
        result = train_locally(
            model,
            self.data.train_examples,
            steps=plan.local_steps,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            dp=dp,
            pad_id=self._tokenizer.pad_token_id,
            optimizer_name=plan.optimizer,
            max_grad_norm=decision.max_grad_norm,
        )
        # Charged before the reply leaves, with the steps that ran: a crash after training over-counts, never under.
        ran = DpSgdSteps(planned.noise_multiplier, sample_rate, result.steps)
        charge = self._ledger.charge(
            fingerprint,
            ran,
            budget=self.policy.privacy.epsilon_budget if plan.dp_enabled else None,
            run_id=plan.run_id,
            round_number=plan.round,
            max_grad_norm=decision.max_grad_norm,
            node=self.settings.name,
        )
        head = self._ledger.head
        self.audit.record(
            "ledger_charge",
            "recorded",
            reason=f"{ran.steps} steps at sigma {ran.noise_multiplier:.3g}",
            round=plan.round,
            run_id=plan.run_id,
            policy_hash=self.policy_hash,
            epsilon=charge.epsilon_after,
            ledger_entries=head.entries,
            ledger_head=head.head,
        )
        self._note_transfer(plan)
        return TrainOutcome(
            update=result.update,
            metrics={
                "num-units": n_units,
                "train-loss": result.mean_loss,
                "epsilon": charge.epsilon_after,
                "noise-multiplier": ran.noise_multiplier,
                "sample-rate": sample_rate,
                "steps": ran.steps,
            },
        )

    def _dp_terms(self, plan: RoundPlan, decision, fingerprint: str, sample_rate: float):
        """(DP settings or None, the steps planned, projected epsilon, adjustments); refuses an over-budget round."""
        adjustments = list(decision.adjustments)
        if not plan.dp_enabled:
            return None, DpSgdSteps(0.0, sample_rate, plan.local_steps), float("inf"), adjustments
        privacy = self.policy.privacy
        try:
            sigma = plan.noise_multiplier
            if sigma is None:
                sigma = noise_for_target(
                    plan.target_epsilon, privacy.delta, sample_rate, plan.local_steps * plan.total_rounds
                )
            sigma, raised = effective_noise(self.policy, sigma)
            if raised:
                adjustments.append(raised)
            planned = DpSgdSteps(sigma, sample_rate, plan.local_steps)
            projected = self._ledger.check_budget(fingerprint, planned, privacy.epsilon_budget)
        except PrivacyError as err:
            self.audit.record(
                "plan",
                "refused",
                reason=str(err),
                round=plan.round,
                run_id=plan.run_id,
                policy_hash=self.policy_hash,
                epsilon=self._ledger.spent(fingerprint),
            )
            raise
        return DpSettings(noise_multiplier=sigma, max_grad_norm=decision.max_grad_norm), planned, projected, adjustments

    def _check_round_moves_forward(self, plan: RoundPlan) -> None:
        done = self._ledger.rounds_charged(plan.run_id, self.settings.name)
        if plan.round < 1:
            self._refuse(plan, "training rounds are numbered from 1")
        if done and plan.round <= max(done):
            self._refuse(
                plan,
                f"round {plan.round} of run {plan.run_id} is not after the last round this node "
                f"trained in it ({max(done)}): a round number only moves forward within a run",
            )

    def evaluate(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> dict[str, float | int]:
        """Held-out loss of an adapter this node may be asked about (see `_check_evaluation`); released outside
        epsilon, so each evaluation is bounded to once per round the node trained in, plus the base model."""
        self._refresh_data()
        self._check_plan(plan, dp_enabled=True)
        digest = adapter_digest(global_state)
        self._check_evaluation(plan, global_state)
        model = self._prepared_model(plan, global_state)
        loss_sum, tokens = heldout_loss(
            model, self.data.heldout_examples, batch_size=plan.eval_batch_size, pad_id=self._tokenizer.pad_token_id
        )
        self._note_transfer(plan)
        self.audit.record(
            "evaluate",
            "completed",
            reason=f"held-out loss over {tokens} tokens",
            round=plan.round,
            run_id=plan.run_id,
            policy_hash=self.policy_hash,
            adapter=digest,
        )
        return {"loss-sum": loss_sum, "tokens": tokens, "num-examples": len(self.data.heldout_examples)}

    def _check_evaluation(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> None:
        """Round 0 evaluates only the initial adapter (LoRA B = 0: the base model itself); round r only after this
        node trained round r of the run; never twice. An unmetered loss oracle on arbitrary adapters is refused."""
        evaluated, _ = self._session(plan.run_id)
        if plan.round in evaluated:
            self._refuse(plan, f"round {plan.round} of run {plan.run_id} was already evaluated on this node")
        if plan.round == 0:
            if any(bool(v.any()) for k, v in global_state.items() if "lora_B" in k):
                self._refuse(plan, "a round-0 evaluation must use the initial adapter (all LoRA B matrices zero)")
        elif plan.round not in self._ledger.rounds_charged(plan.run_id, self.settings.name):
            self._refuse(
                plan, f"this node did not train round {plan.round} of run {plan.run_id}, so it does not evaluate it"
            )

    def _session(self, run_id: str) -> tuple[dict[int, str], bool]:
        """What this node already released for a run: {round: adapter digest} evaluated, and whether it audited."""
        evaluated: dict[int, str] = {}
        audited = False
        for e in self.audit.entries():
            if e.get("run_id") != run_id or e.get("decision") != "completed":
                continue
            if e["action"] == "evaluate":
                evaluated[int(e["round"])] = str(e["adapter"])
            elif e["action"] == "memorisation_audit":
                audited = True
        return evaluated, audited

    def memorisation_audit(
        self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, float], list[str]]:
        """Audit the run's final model here, once, on this node's canaries and records; only numbers leave.

        The count of PII spans in generations found verbatim in this node's training data stays in the node's
        audit log: released, it would answer "is this string in your data" for any adapter a coordinator crafts.
        """
        from client.memorisation import audit

        self._refresh_data()
        self.check_coordinator(plan.coordinator_jurisdiction, plan.round)
        evaluated, audited = self._session(plan.run_id)
        digest = adapter_digest(global_state)
        if audited:
            self._refuse(plan, f"run {plan.run_id} was already audited on this node (once per run)")
        if not self._ledger.rounds_charged(plan.run_id, self.settings.name):
            self._refuse(plan, f"this node trained nothing in run {plan.run_id}, so it audits nothing for it")
        if not evaluated or evaluated[max(evaluated)] != digest:
            self._refuse(plan, "the audit runs only on the run's final adapter (the one this node last evaluated)")
        model = self._prepared_model(plan, global_state)
        metrics, examples = audit(
            model,
            self._tokenizer,
            canaries=self.data.canaries,
            members=self.data.record_examples,
            nonmembers=self.data.heldout_examples,
            train_raw_texts=self.data.train_raw_texts,
            settings=self.settings.audit,
        )
        verbatim = metrics.pop("pii-spans-verbatim-in-training", None)
        fingerprint = self._ledger.register(self.data.train_units)
        metrics.update(epsilon=self._ledger.spent(fingerprint), delta=self.policy.privacy.delta)
        self._note_transfer(plan)
        self.audit.record(
            "memorisation_audit",
            "completed",
            reason="audit numbers computed on this node",
            round=plan.round,
            run_id=plan.run_id,
            policy_hash=self.policy_hash,
            epsilon=metrics["epsilon"],
            adapter=digest,
            pii_spans_verbatim_in_training=verbatim,
        )
        return metrics, examples

    def check_cohort(self, size: int, stage: str, round_number: int | None) -> None:
        PolicyGate.check_cohort(self, size, stage, round_number)  # same rule, node already has policy + audit

    def _check_plan(self, plan: RoundPlan, dp_enabled: bool):
        self.check_coordinator(plan.coordinator_jurisdiction, plan.round)
        decision = check_plan(
            self.policy,
            PlanTerms(
                self.settings.coordinator_jurisdiction,
                dp_enabled,
                plan.max_grad_norm,
                plan.secure_aggregation,
                plan.cohort_size,
            ),
        )
        if not decision.accepted:
            self._refuse(plan, decision.explain())
        return decision

    def _refuse(self, plan: RoundPlan, why: str) -> NoReturn:
        self.audit.record(
            "plan", "refused", reason=why, round=plan.round, run_id=plan.run_id, policy_hash=self.policy_hash
        )
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
# Nodes started and base models loaded by this process: a warm worker reports them with every message.
STARTS: Counter[str] = Counter()
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
    key = (str(path), str(device), str(dtype), model_cfg.gradient_checkpointing, repr(lora), seed)
    with _CACHE_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one prepared model per process: a different setup replaces it
            base = load_base_model(path, device, dtype, gradient_checkpointing=model_cfg.gradient_checkpointing)
            _MODELS[key] = attach_lora(base, lora, seed)
            STARTS["model"] += 1
        return _MODELS[key]
