"""A regional node: its own data, its own privacy ledger, and the rounds it agrees to run.

Plain Python (no Flower), so tests drive it directly; `client.app` is the Flower glue.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from client.training import DpSettings, encode_units, heldout_loss, train_locally
from common.config import DataSource, FedsovConfig, LoraSettings, ModelConfig, PrivacyConfig, PrivacyUnitKind
from common.data.partition import client_partition, split_heldout
from common.data.records import load_records
from common.errors import FederationError, ModelError, PrivacyError
from common.model.loading import load_base_model, load_tokenizer, model_fingerprint, pick_device, pick_dtype, resolve_model_path
from common.model.lora import attach_lora, load_adapter_state
from common.privacy.accounting import DpSgdSteps, noise_for_target
from common.privacy.ledger import PrivacyLedger
from common.privacy.units import group_units
from common.wire import RoundPlan

LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class NodeSettings:
    """Where a node's data and state live, and the privacy terms it keeps for itself."""

    name: str
    region: str
    data_paths: tuple[str, ...]
    plain_text_consent: bool | None
    client_index: int
    num_clients: int
    heldout_fraction: float
    state_dir: Path
    model: ModelConfig
    privacy: PrivacyConfig
    threads: int


def simulation_settings(cfg: FedsovConfig, partition_id: int) -> NodeSettings:
    """Map a simulated node's partition id to its region and client slot (config order)."""
    first = 0
    for region in cfg.regions.values():
        if partition_id < first + region.clients:
            index = partition_id - first
            if region.data.source == DataSource.synthetic:
                paths: tuple[str, ...] = (str(Path(cfg.data.root) / region.name),)
            else:
                paths = tuple(region.data.paths)
            name = f"{region.name}-{index + 1}"
            return NodeSettings(
                name=name,
                region=region.name,
                data_paths=paths,
                plain_text_consent=region.data.plain_text_consent,
                client_index=index,
                num_clients=region.clients,
                heldout_fraction=cfg.data.heldout_fraction,
                state_dir=Path(cfg.workdir) / "nodes" / name,
                model=cfg.model,
                privacy=cfg.privacy,
                threads=cfg.simulation.client_cpus,
            )
        first += region.clients
    raise FederationError(
        f"Simulated node with partition-id {partition_id} has no region: the configured regions "
        f"have {first} clients in total. Run the simulation with that many supernodes."
    )


@dataclass
class NodeData:
    train_units: list
    train_examples: list[list[int]]
    heldout_examples: list[list[int]]
    records: int
    excluded_no_consent: int


@dataclass
class TrainOutcome:
    update: Mapping[str, torch.Tensor]
    metrics: dict[str, float | int]


class RegionNode:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        torch.set_num_threads(max(1, settings.threads))
        self._model_path = resolve_model_path(settings.model)
        self._tokenizer = load_tokenizer(self._model_path)
        self._data: NodeData | None = None
        self._ledger = PrivacyLedger(
            settings.state_dir / LEDGER_FILE, delta=settings.privacy.delta, unit=settings.privacy.unit
        )

    # -- data ---------------------------------------------------------------------------
    @property
    def data(self) -> NodeData:
        if self._data is None:
            self._data = self._load_data()
        return self._data

    def _load_data(self) -> NodeData:
        s = self.settings
        records = load_records(s.data_paths, expected_region=s.region, plain_text_consent=s.plain_text_consent)
        consented = [r for r in records if r.consent]
        mine = client_partition(consented, client_index=s.client_index, num_clients=s.num_clients)
        train, heldout = split_heldout(mine, fraction=s.heldout_fraction)
        if not train:
            raise PrivacyError(
                f"Node {s.name} has no training records after consent filtering and the held-out split "
                f"({len(records)} records, {len(records) - len(consented)} without consent). Add data or "
                "lower data.heldout_fraction."
            )
        units = group_units(train, s.privacy.unit)
        max_length = s.model.max_length
        if s.privacy.enabled and s.privacy.delta > 1.0 / len(units):
            raise PrivacyError(
                f"privacy.delta={s.privacy.delta:g} is larger than 1/N = 1/{len(units)} for the {len(units)} "
                f"privacy units ({s.privacy.unit.value}s) on node {s.name}: a mechanism could then publish "
                f"a whole unit and still meet the guarantee. Set privacy.delta <= {1.0 / len(units):.3g}."
            )
        return NodeData(
            train_units=units,
            train_examples=encode_units(units, self._tokenizer, max_length),
            heldout_examples=encode_units(group_units(heldout, PrivacyUnitKind.record), self._tokenizer, max_length),
            records=len(records),
            excluded_no_consent=len(records) - len(consented),
        )

    # -- protocol ------------------------------------------------------------------------
    def describe(self) -> tuple[dict[str, str], dict[str, float | int]]:
        fingerprint = self._ledger.register(self.data.train_units)
        return (
            {"region": self.settings.region, "node-name": self.settings.name},
            {
                "num-units": len(self.data.train_units),
                "records": self.data.records,
                "excluded-no-consent": self.data.excluded_no_consent,
                "heldout-records": len(self.data.heldout_examples),
                "epsilon": self._ledger.spent(fingerprint),
            },
        )

    def train_round(self, plan: RoundPlan, global_state: Mapping[str, torch.Tensor]) -> TrainOutcome:
        """Check the plan against this node's budget, train with DP, charge the ledger, return the update."""
        data = self.data
        n_units = len(data.train_units)
        sample_rate = plan.batch_size / n_units
        if sample_rate >= 1:
            raise PrivacyError(
                f"federation.batch_size={plan.batch_size} is not below the {n_units} privacy units on node "
                f"{self.settings.name}: Poisson sampling needs rate < 1. Lower federation.batch_size."
            )
        fingerprint = self._ledger.register(data.train_units)
        privacy = self.settings.privacy
        dp = None
        if plan.dp_enabled:
            sigma = plan.noise_multiplier
            if sigma is None:
                if plan.target_epsilon is None:
                    raise PrivacyError("The round plan enables DP but sets neither noise_multiplier nor target_epsilon.")
                sigma = noise_for_target(
                    plan.target_epsilon, privacy.delta, sample_rate, plan.local_steps * plan.total_rounds
                )
            dp = DpSettings(noise_multiplier=sigma, max_grad_norm=plan.max_grad_norm)
            planned = DpSgdSteps(sigma, sample_rate, plan.local_steps)
            self._ledger.check_budget(fingerprint, planned, privacy.epsilon_budget)
        else:
            planned = DpSgdSteps(0.0, sample_rate, plan.local_steps)

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
            fingerprint,
            planned,
            budget=privacy.epsilon_budget if plan.dp_enabled else None,
            run_id=plan.run_id,
            round_number=plan.round,
        )
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
        model = self._prepared_model(plan, global_state)
        loss_sum, tokens = heldout_loss(
            model, self.data.heldout_examples, batch_size=plan.eval_batch_size, pad_id=self._tokenizer.pad_token_id
        )
        return {"loss-sum": loss_sum, "tokens": tokens, "num-examples": len(self.data.heldout_examples)}

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

