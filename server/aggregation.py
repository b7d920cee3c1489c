"""Federated averaging of adapter updates, weighted by each client's privacy-unit count."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from common.wire import WireError


def check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """An update must carry exactly the expected tensors, shapes and dtype (float32)."""
    if set(update) != set(expected):
        extra = sorted(set(update) - set(expected))
        missing = sorted(set(expected) - set(update))
        raise WireError(f"Update tensors differ from the plan: unexpected {extra[:3]}, missing {missing[:3]}.")
    for name, tensor in update.items():
        if tuple(tensor.shape) != tuple(expected[name].shape) or tensor.dtype != torch.float32:
            raise WireError(
                f"Update tensor {name} is {tensor.dtype}{tuple(tensor.shape)}, expected "
                f"float32{tuple(expected[name].shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise WireError(f"Update tensor {name} holds NaN or infinite values.")


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> OrderedDict[str, torch.Tensor]:
    """sum_i w_i * update_i / sum_i w_i, tensor by tensor."""
    if not updates or len(updates) != len(weights):
        raise ValueError("weighted_mean needs one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    mean: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in updates[0]:
        acc = torch.zeros_like(updates[0][name], dtype=torch.float64)
        for update, w in zip(updates, weights, strict=True):
            acc += update[name].to(torch.float64) * w
        mean[name] = (acc / total).to(torch.float32)
    return mean


def apply_update(
    state: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], server_learning_rate: float = 1.0
) -> OrderedDict[str, torch.Tensor]:
    """New global adapter: state + lr * update on the updated tensors, others unchanged."""
    return OrderedDict(
        (name, tensor + server_learning_rate * update[name] if name in update else tensor.clone())
        for name, tensor in state.items()
    )
