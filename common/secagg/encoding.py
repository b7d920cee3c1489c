"""Integer encoding of what is summed securely: a weighted adapter update and a few metrics.

The update segment lives modulo 2**32 (4 bytes per value on the wire, as many as float32);
metrics live modulo 2**64. Each client sends weight * q(x), where q maps [-R, R] onto the
integers 0..L with unbiased stochastic rounding, and L is as large as the cohort's total
weight allows without the sum wrapping around: L = floor((2**32 - 1) / total_weight).
The decoded weighted mean is then off by at most one step 2R/L per value.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

import numpy as np

from common.secagg.crypto import SecAggError

DATA_DTYPE = np.uint32
METRIC_DTYPE = np.uint64
DATA_MODULUS = 2**32
METRIC_SCALE = 10**6  # metrics travel as fixed-point micro-units
MIN_LEVELS = 2**12
RMSPROP_ALPHA = 0.999  # DP-RMSprop's decay of its mean of squared gradients (client.training uses the same)

Layout = Sequence[tuple[str, tuple[int, ...]]]


def adam_displacement_bound(learning_rate: float, steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """Largest change Adam can make to one value in `steps` steps (Kingma & Ba 2015, sec. 2.1).

    Adam normalises each gradient coordinate, so a round's update is bounded by the optimiser,
    not by the DP clipping norm: |step| <= lr * (1 - b1) / sqrt(1 - b2) when (1 - b1) > sqrt(1 - b2),
    else lr. Clipping the update to this range therefore never clips anything.
    """
    per_step = max(1.0, (1 - beta1) / (1 - beta2) ** 0.5)
    return learning_rate * per_step * steps


def sgd_update_range(learning_rate: float, steps: int, max_grad_norm: float) -> float:
    """The range that holds one value of a round's DP-SGD update, but for rare noise outliers.

    A step moves the adapter by lr * (sum of clipped gradients + N(0, (sigma C)^2)) / B, B the expected
    batch: the clipped part has norm at most C * |batch| / B, and the Poisson batch stays below 2B all but
    rarely, so `steps` steps move a value by at most 2 lr C steps. The noise is unbounded; for sigma <= B
    its sum over the round has a standard deviation of at most lr C sqrt(steps) per value, and 6 of them
    are added. What still falls outside is clipped and counted by the secure sum (`clipped-values`):
    clipping an update after training is post-processing, it costs no privacy, only bias.
    """
    return learning_rate * max_grad_norm * (2 * steps + 6 * steps**0.5)


def rmsprop_displacement_bound(learning_rate: float, steps: int, alpha: float) -> float:
    """Largest change RMSprop can make to one value in `steps` steps.

    Its running mean v of squared gradients takes (1 - alpha) g^2 of each step's own gradient g, so
    |lr g / sqrt(v)| <= lr / sqrt(1 - alpha), whatever v started from: clipping to this range never clips.
    """
    return learning_rate * steps / (1 - alpha) ** 0.5


def update_range(optimizer: str, learning_rate: float, steps: int, max_grad_norm: float) -> float:
    """The secure sum's range [-R, R] for one value of a round's update by `optimizer`."""
    if optimizer == "sgd":
        return sgd_update_range(learning_rate, steps, max_grad_norm)
    if optimizer == "rmsprop":
        return rmsprop_displacement_bound(learning_rate, steps, RMSPROP_ALPHA)
    return adam_displacement_bound(learning_rate, steps)


@dataclass(frozen=True)
class Quantization:
    clip_range: float
    levels: int

    @classmethod
    def for_cohort(cls, clip_range: float, total_weight: int) -> Quantization:
        levels = (DATA_MODULUS - 1) // max(1, total_weight)
        if levels < MIN_LEVELS:
            raise SecAggError(
                f"The cohort's total weight {total_weight} leaves only {levels} quantization levels in a 32-bit "
                f"sum (at least {MIN_LEVELS} needed). Aggregate fewer privacy units per round."
            )
        return cls(clip_range=clip_range, levels=levels)

    @property
    def step(self) -> float:
        return 2 * self.clip_range / self.levels

    def encode(self, values: np.ndarray, weight: int) -> tuple[np.ndarray, int]:
        """weight * q(values) as uint32, and how many values had to be clipped to [-R, R]."""
        values = values.astype(np.float64)
        clipped = int(np.count_nonzero(np.abs(values) > self.clip_range))
        scaled = (np.clip(values, -self.clip_range, self.clip_range) + self.clip_range) / self.step
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        rounded = np.floor(scaled + rng.random(scaled.shape))  # unbiased stochastic rounding
        rounded = np.clip(rounded, 0, self.levels).astype(np.uint64)
        return (rounded * np.uint64(weight)).astype(DATA_DTYPE), clipped

    def decode(self, total: np.ndarray, total_weight: int) -> np.ndarray:
        """The weighted mean of the encoded values from the modular sum of weight * q(x)."""
        return (total.astype(np.float64) * self.step / total_weight - self.clip_range).astype(np.float32)


def encode_metric(value: float) -> int:
    if value < 0 or not np.isfinite(value):
        raise SecAggError(f"Metric {value} cannot be summed securely: only finite non-negative values.")
    return int(round(value * METRIC_SCALE))


def decode_metric(total: int) -> float:
    return int(total) / METRIC_SCALE


def layout_of(state: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(state[name].shape)) for name in sorted(state)]


def flatten(update: Mapping[str, Any], layout: Layout) -> np.ndarray:
    """Torch tensors or numpy arrays, in layout order, as one float32 vector."""
    if set(update) != {name for name, _ in layout}:
        raise SecAggError("The update's tensors differ from the aggregation layout the coordinator sent.")

    def as_numpy(value: Any) -> np.ndarray:
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        return np.asarray(value, dtype=np.float32).reshape(-1)

    return np.concatenate([as_numpy(update[name]) for name, _ in layout])


def unflatten(vector: np.ndarray, layout: Layout) -> OrderedDict[str, torch.Tensor]:
    import torch

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for name, shape in layout:
        size = int(np.prod(shape))
        out[name] = torch.from_numpy(vector[offset : offset + size].copy()).reshape(shape)
        offset += size
    return out


# What each client adds to the metric segment, in its slot (zeros in the other slots), followed by one
# global counter. The coordinator learns per-slot sums, never a client's value.
METRIC_SLOTS = {
    "train": (("loss-x-units", "units"), "clipped-values"),
    "evaluate": (("loss-sum", "tokens", "examples"), "clients"),
}
OTHER_REGIONS = "other-regions"


def metric_slots(regions: Sequence[str]) -> tuple[list[str], list[str]]:
    """(slot names, the slot of each client) for clients in `regions` (one entry per client).

    A region gets its own slot only with at least two clients; the others share one slot. A lone client
    outside every slot would be revealed by subtracting the slots from the total, so the smallest region
    joins the shared slot until it holds none or at least two. Every node computes this itself from the
    regions its roster gives its peers; the coordinator cannot choose a slot that isolates one client.
    """
    counts: dict[str, int] = {}
    for region in regions:
        counts[region] = counts.get(region, 0) + 1
    own = sorted(r for r, c in counts.items() if c >= 2)
    rest = sum(c for r, c in counts.items() if c < 2)
    while rest == 1 and own:
        smallest = min(own, key=lambda r: (counts[r], r))
        own.remove(smallest)
        rest += counts[smallest]
    slots = own + ([OTHER_REGIONS] if rest else [])
    return slots, [r if r in own else OTHER_REGIONS for r in regions]


def metric_vector(
    kind: str, slots: Sequence[str], slot: str, values: Mapping[str, float], counter: float
) -> np.ndarray:
    names, _ = METRIC_SLOTS[kind]
    if slot not in slots:
        raise SecAggError(f"Slot '{slot}' is not in this aggregation (slots: {', '.join(slots)}).")
    vector = np.zeros(len(slots) * len(names) + 1, dtype=METRIC_DTYPE)
    start = slots.index(slot) * len(names)
    for i, name in enumerate(names):
        vector[start + i] = encode_metric(values[name])
    vector[-1] = encode_metric(counter)
    return vector


def read_metric_vector(
    kind: str, slots: Sequence[str], vector: np.ndarray
) -> tuple[dict[str, dict[str, float]], float]:
    names, _ = METRIC_SLOTS[kind]
    per_slot = {
        slot: {name: decode_metric(vector[r * len(names) + i]) for i, name in enumerate(names)}
        for r, slot in enumerate(slots)
    }
    return per_slot, decode_metric(vector[-1])


def metric_length(kind: str, slots: Sequence[str]) -> int:
    return len(slots) * len(METRIC_SLOTS[kind][0]) + 1
