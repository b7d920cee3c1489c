"""What travels between the coordinator and a regional node, as Flower records.

Message types (the protocol needs no others):
  query.describe  coordinator -> node: who are you?  reply: region, unit counts, epsilon spent
  train           the round plan and the global adapter. With secure aggregation (default) the
                  reply is two public keys, the unit count and epsilon spent: the update itself
                  only leaves masked, in train.secagg_mask. Without it: the update and metrics.
  evaluate        the global adapter; reply: keys (secure) or held-out loss sum and token count
  train|evaluate.secagg_shares / .secagg_mask / .secagg_confirm / .secagg_unmask
                  the later stages of secure aggregation (common.secagg.protocol)
  query.audit     the final adapter; reply: the node's memorisation-audit numbers and its
                  canary prompts with the secrets blacked out (client.memorisation)
A node that refuses (budget, policy) replies with an Error carrying REFUSED and the reason,
and sends nothing else.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are used: light messages never load it
    import torch

from common.schema import Bool, Float, Int, Items, Optional, SchemaError, Spec, Text, check_record

DESCRIBE = "query.describe"
AUDIT = "query.audit"
TRAIN = "train"
EVALUATE = "evaluate"

SECAGG_STAGES = ("secagg_shares", "secagg_mask", "secagg_confirm", "secagg_unmask")
# The counts from a node's start checks that describe carries (so the report shows what was excluded or cut).
DATA_COUNTS = (
    "records",
    "excluded-no-consent",
    "excluded-special",
    "heldout-records",
    "skipped-files",
    "truncated-units",
    "truncated-tokens",
    "truncated-heldout",
)

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
# A node's ledger and audit-log heads (describe and train replies): the coordinator's anchors.
EVIDENCE = "evidence"

# The only scalar metrics a reply may carry in the clear.
TRAIN_METRICS = ("num-units", "train-loss", "epsilon", "noise-multiplier", "sample-rate", "steps")
SECURE_TRAIN_METRICS = ("num-units", "epsilon")
EVALUATE_METRICS = ("loss-sum", "tokens", "num-examples")


class WireError(SchemaError):
    """A message does not have the shape the protocol expects."""


# Ceilings a node applies to any plan, whatever the coordinator asks: a plan can make no loop run
# unbounded. The privacy budget bounds what training may spend; these bound what it may cost.
MAX_ROUNDS = 100_000
MAX_LOCAL_STEPS = 10_000
MAX_BATCH = 1_000_000
MAX_PEERS = 4096
RUN_ID = Text(128, r"[A-Za-z0-9._:#-]+")
JURISDICTION = Text(32, r"[A-Za-z0-9*_-]+")
FINGERPRINT = Text(64, r"[0-9a-f]{64}")
MODULE_NAME = Text(128, r"[A-Za-z0-9_.*-]+")
OPTIMIZERS = r"adamw|sgd|rmsprop"  # common.config.OptimizerChoice

PLAN_FIELDS: dict[str, Spec] = {
    "run-id": RUN_ID,
    "round": Int(0, MAX_ROUNDS),
    "total-rounds": Int(1, MAX_ROUNDS),
    "local-steps": Int(1, MAX_LOCAL_STEPS),
    "batch-size": Int(1, MAX_BATCH),
    "optimizer": Text(8, OPTIMIZERS),
    "learning-rate": Float(0.0, 10.0, open_lo=True),
    "max-length": Int(1, 1 << 20),
    "eval-batch-size": Int(1, 65_536),
    "model-fingerprint": FINGERPRINT,
    "lora-rank": Int(1, 4096),
    "lora-alpha": Float(0.0, 1e6, open_lo=True),
    "lora-dropout": Float(0.0, 1.0, open_hi=True),
    "lora-ffa": Bool(),
    "lora-seed": Int(0, 2**63 - 1),
    "dp-enabled": Bool(),
    "max-grad-norm": Float(0.0, 1e6, open_lo=True),
    "coordinator-jurisdiction": JURISDICTION,
    "cohort-size": Int(1, MAX_PEERS),
    "secure-aggregation": Bool(),
    "noise-multiplier": Optional(Float(0.0, 1e4, open_lo=True)),
    "target-epsilon": Optional(Float(0.0, 1e4, open_lo=True)),
    "lora-target-modules": Items(MODULE_NAME, max_items=64, distinct=True),
}

HASH = FINGERPRINT
# What a node reports of its evidence, and what a coordinator sends back as the anchor to check.
EVIDENCE_FIELDS: dict[str, Spec] = {
    "ledger-genesis": HASH,
    "ledger-entries": Int(0, 2**40),
    "ledger-head": HASH,
    "audit-genesis": HASH,
    "audit-entries": Int(0, 2**40),
    "audit-head": HASH,
}
ANCHOR_FIELDS: dict[str, Spec] = {"ledger-genesis": HASH, "ledger-entries": Int(1, 2**40), "ledger-head": HASH}
DESCRIBE_REQUEST_FIELDS: dict[str, Spec] = {"run-id": RUN_ID, "coordinator-jurisdiction": JURISDICTION}
AUDIT_REQUEST_FIELDS: dict[str, Spec] = {"coordinator-jurisdiction": JURISDICTION}


@dataclass(frozen=True)
class RoundPlan:
    """Everything a node needs to run one round, decided by the coordinator (and checked by the node)."""

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
    optimizer: str = "adamw"

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
    def from_record(cls, record: Mapping[str, Any]) -> RoundPlan:
        """The plan, every field typed and ranged by PLAN_FIELDS; anything else is a SchemaError."""
        values = check_record(record, PLAN_FIELDS, "round plan")
        if values["round"] > values["total-rounds"]:
            raise SchemaError(f"round plan: round {values['round']} is past total-rounds {values['total-rounds']}")
        if values["dp-enabled"] and (values["noise-multiplier"] is None) == (values["target-epsilon"] is None):
            raise SchemaError("round plan: DP needs exactly one of noise-multiplier and target-epsilon")
        values["lora-target-modules"] = tuple(values["lora-target-modules"])
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})


def aggregation_tag(run_id: str, round_number: int, kind: str) -> bytes:
    """Binds every secure-aggregation key and mask to one run, round and purpose."""
    return f"fedsov/secagg/v1|{run_id}|{round_number}|{kind}".encode()


def plan_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 of a plan record's canonical JSON: secure aggregation binds every node to the same plan."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(dict(record), sort_keys=True).encode()).hexdigest()


def adapter_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over an adapter's tensor names, shapes and float32 bytes: which adapter a node was shown."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


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


# An adapter travels as two arrays: every value in one float32 vector, and its layout (tensor names and
# shapes, JSON). Flower moves a message's content as one object per array and per chunk, each its own
# request: a tensor per array made a global adapter some 50 requests, seconds of every deployed round.
ADAPTER_VALUES, ADAPTER_LAYOUT = "values", "layout"
MAX_ADAPTER_TENSORS, MAX_TENSOR_DIMS = 10_000, 8


def state_to_record(state: Mapping[str, torch.Tensor]):
    """Adapter tensors as an ArrayRecord of two arrays, always float32 (ArrayRecord refuses bfloat16)."""
    import json

    import torch
    from flwr.app import ArrayRecord

    parts = [v.detach().to("cpu", torch.float32).reshape(-1) for v in state.values()]
    values = torch.cat(parts) if parts else torch.zeros(0)
    layout = json.dumps([[name, list(tensor.shape)] for name, tensor in state.items()]).encode()
    return ArrayRecord(
        OrderedDict(
            [(ADAPTER_VALUES, values), (ADAPTER_LAYOUT, torch.frombuffer(bytearray(layout), dtype=torch.uint8))]
        )
    )


def record_to_state(record) -> OrderedDict[str, torch.Tensor]:
    """The adapter tensors a record carries; anything but a well-formed, finite float32 adapter is refused."""
    import torch

    arrays = record.to_torch_state_dict()
    if set(arrays) != {ADAPTER_VALUES, ADAPTER_LAYOUT}:
        raise WireError(
            f"An adapter record holds exactly {ADAPTER_VALUES!r} and {ADAPTER_LAYOUT!r}, not {sorted(arrays)[:4]}."
        )
    values, layout = arrays[ADAPTER_VALUES], _adapter_layout(arrays[ADAPTER_LAYOUT])
    if values.dtype != torch.float32 or values.dim() != 1:
        raise WireError(
            f"Adapter values arrived as {values.dtype}{tuple(values.shape)}; the protocol carries a float32 vector."
        )
    sizes = [_numel(shape) for _, shape in layout]
    if sum(sizes) != values.numel():
        raise WireError(f"The adapter layout describes {sum(sizes)} values; {values.numel()} arrived.")
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (name, shape), tensor in zip(layout, torch.split(values, sizes), strict=True):
        if not torch.isfinite(tensor).all():
            raise WireError(f"Adapter tensor {name} holds NaN or infinite values.")
        state[name] = tensor.reshape(shape).clone()
    return state


def _adapter_layout(array) -> list[tuple[str, list[int]]]:
    """Tensor names and shapes: unique names, at most MAX_ADAPTER_TENSORS, whole non-negative dimensions."""
    import json

    import torch

    if array.dtype != torch.uint8 or array.dim() != 1:
        raise WireError("The adapter layout is not a byte string.")
    try:
        entries = json.loads(bytes(array.numpy()).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise WireError(f"The adapter layout is not JSON ({err}).") from err
    if not isinstance(entries, list) or len(entries) > MAX_ADAPTER_TENSORS:
        raise WireError(f"The adapter layout is not a list of at most {MAX_ADAPTER_TENSORS} tensors.")
    layout = []
    for entry in entries:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        dims = entry[1] if ok else []
        if not ok or len(dims) > MAX_TENSOR_DIMS or not all(type(d) is int and 0 <= d < 2**31 for d in dims):
            raise WireError(f"Malformed adapter layout entry {str(entry)[:80]}: expected [name, [whole dimensions]].")
        layout.append((entry[0], dims))
    if len({name for name, _ in layout}) != len(layout):
        raise WireError("The adapter layout repeats a tensor name.")
    return layout


def _numel(shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count
