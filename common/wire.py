"""What travels between the coordinator and a regional node, as Flower records.

Message types (the protocol needs no others):
  query.describe  coordinator -> node: who are you?  reply: region, unit counts, epsilon spent
  train           the round plan and the global adapter. With secure aggregation (default) the
                  reply is two public keys, the unit count and epsilon spent: the update itself
                  only leaves masked, in train.secagg_mask. Without it: the update and metrics.
  evaluate        the global adapter; reply: keys (secure) or held-out loss sum and token count
  train|evaluate.secagg_shares / .secagg_mask / .secagg_unmask
                  the three later stages of secure aggregation (common.secagg.protocol)
  query.audit     the final adapter; reply: the node's memorisation-audit numbers and its
                  canary prompts with the secrets blacked out (client.memorisation)
A node that refuses (budget, policy) replies with an Error carrying REFUSED and the reason,
and sends nothing else.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch is imported where tensors are used: light messages never load it
    import torch

from common.errors import FedsovError

DESCRIBE = "query.describe"
AUDIT = "query.audit"
TRAIN = "train"
EVALUATE = "evaluate"

SECAGG_STAGES = ("secagg_shares", "secagg_mask", "secagg_unmask")

# Error codes in replies. Flower uses small codes for its own errors.
REFUSED = 4001

# Record names inside a message's RecordDict.
REQUEST = "request"
PLAN = "plan"
GLOBAL_ADAPTER = "global-adapter"
UPDATE = "update"
METRICS = "metrics"
NODE = "node"
EXAMPLES = "examples"

SECAGG_KEYS = "secagg-keys"
SECAGG = "secagg"

# The only scalar metrics a reply may carry in the clear.
TRAIN_METRICS = ("num-units", "train-loss", "epsilon", "noise-multiplier", "sample-rate", "steps")
SECURE_TRAIN_METRICS = ("num-units", "epsilon")
EVALUATE_METRICS = ("loss-sum", "tokens", "num-examples")


class WireError(FedsovError):
    """A message does not have the shape the protocol expects."""


@dataclass(frozen=True)
class RoundPlan:
    """Everything a node needs to run one round, decided by the coordinator."""

    run_id: str
    round: int
    total_rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_length: int
    eval_batch_size: int
    model_fingerprint: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_ffa: bool
    lora_seed: int
    dp_enabled: bool
    max_grad_norm: float
    coordinator_jurisdiction: str
    cohort_size: int
    secure_aggregation: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    lora_target_modules: tuple[str, ...] = field(default_factory=tuple)

    def to_record(self):
        from flwr.app import ConfigRecord

        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue  # ConfigRecord has no null; absence means None
            values[f.name.replace("_", "-")] = list(v) if isinstance(v, tuple) else v
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RoundPlan":
        values = {k.replace("-", "_"): v for k, v in record.items()}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise WireError(f"Round plan has unknown fields {unknown}; coordinator and node versions differ.")
        if "lora_target_modules" in values:
            values["lora_target_modules"] = tuple(values["lora_target_modules"])
        try:
            return cls(**values)
        except TypeError as err:
            raise WireError(f"Round plan is incomplete: {err}") from err


def aggregation_tag(run_id: str, round_number: int, kind: str) -> bytes:
    """Binds every secure-aggregation key and mask to one run, round and purpose."""
    return f"fedsov/secagg/v1|{run_id}|{round_number}|{kind}".encode()


def payload_bytes(content) -> int:
    """Bytes of a message's payload: arrays, bytes and strings as stored, 8 per number."""
    from flwr.app import ArrayRecord

    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
            continue
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


def state_to_record(state: Mapping[str, "torch.Tensor"]):
    """Adapter tensors as an ArrayRecord, always float32 (ArrayRecord refuses bfloat16)."""
    import torch
    from flwr.app import ArrayRecord

    return ArrayRecord(OrderedDict((k, v.detach().to("cpu", torch.float32).contiguous()) for k, v in state.items()))


def record_to_state(record) -> "OrderedDict[str, torch.Tensor]":
    import torch

    state = record.to_torch_state_dict()
    for k, v in state.items():
        if v.dtype != torch.float32:
            raise WireError(f"Adapter tensor {k} arrived as {v.dtype}; the protocol carries float32 only.")
    return OrderedDict(state)
