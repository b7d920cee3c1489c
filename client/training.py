"""Local DP-LoRA training and held-out evaluation on one node's privacy units.

DP-SGD (Abadi et al. 2016) with Opacus: Poisson sampling of units at rate q, per-unit
gradient clipping to C, Gaussian noise sigma*C on the summed clipped gradients. The noisy
mean gradient then feeds plain SGD or AdamW (DP-Adam); either is post-processing, so the
privacy cost is the same. Only the LoRA tensors train; the base model is frozen.
"""

from __future__ import annotations

import secrets
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.model.lora import adapter_state, trainable_names
from common.privacy.units import PrivacyUnit
from common.secagg.encoding import RMSPROP_ALPHA


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float
    max_grad_norm: float


@dataclass
class LocalTrainResult:
    update: OrderedDict[str, torch.Tensor]  # trained minus received, trainable tensors, float32 CPU
    mean_loss: float
    steps: int  # optimiser steps that actually ran (what the ledger charges)
    units_sampled: int


def secret_generator(device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from the OS random source, never from a seed anyone shares.

    The default generators are seeded by whoever called `torch.manual_seed` last (the model build,
    LoRA's public initialisation seed): noise drawn from them could be recomputed by the coordinator.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def encode_units(units: Sequence[PrivacyUnit], tokenizer, max_length: int | None) -> list[list[int]]:
    """Token ids per unit: its texts joined by EOS, ending in EOS, cut at max_length (None: uncut)."""
    eos = tokenizer.eos_token_id
    encoded = []
    for unit in units:
        ids: list[int] = []
        for text in unit.texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.append(eos)
        encoded.append(ids[:max_length])
    return encoded


def local_optimizer(
    name: str, params: list[torch.nn.Parameter], learning_rate: float, dp: DpSettings | None, batch_size: int
) -> torch.optim.Optimizer:
    """The optimiser that the privatised gradient feeds (post-processing: any choice costs no privacy).

    rmsprop: each step moves a value by lr * g / sqrt(v), v a running mean of g^2 that starts at the DP noise's
    variance per value, (sigma C / B)^2: sigma, C and the expected batch B are public, so the start is known, not
    estimated. At this data size the noise dominates g; Adam, restarted every round, estimates the same variance
    from a few noisy squares and takes sign-like first steps. Without DP there is no noise to start from.
    """
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    if name != "rmsprop":
        raise ValueError(f"Unknown optimizer {name!r}; use adamw, sgd or rmsprop (federation.optimizer).")
    if dp is None:
        raise ValueError("federation.optimizer=rmsprop needs DP: it starts from the DP noise's variance; use adamw.")
    optimizer = torch.optim.RMSprop(params, lr=learning_rate, alpha=RMSPROP_ALPHA)
    noise_variance = (dp.noise_multiplier * dp.max_grad_norm / batch_size) ** 2
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(0.0), "square_avg": torch.full_like(p, noise_variance)}
    return optimizer


def train_locally(
    peft_model,
    examples: Sequence[Sequence[int]],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    dp: DpSettings | None,
    pad_id: int,
    optimizer_name: str = "adamw",
    max_grad_norm: float | None = None,
) -> LocalTrainResult:
    """Run `steps` optimiser steps on Poisson-sampled batches; return the adapter update.

    Without DP, SGD clips each batch gradient to `max_grad_norm` (when given), so its update stays
    within the range the secure sum expects (`common.secagg.encoding.sgd_update_range`)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    device = next(peft_model.parameters()).device
    keys = trainable_names(peft_model)
    received = adapter_state(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    # Sampling must stay secret to keep the privacy amplification of Poisson sampling.
    generator = secret_generator(torch.device("cpu"))
    sample_rate = batch_size / len(examples)
    sampler = UniformWithReplacementSampler(
        num_samples=len(examples), sample_rate=sample_rate, generator=generator, steps=steps
    )
    optimizer = local_optimizer(optimizer_name, params, learning_rate, dp, batch_size)
    clip_batch = dp is None and optimizer_name == "sgd" and max_grad_norm is not None
    model = peft_model
    noise = secret_generator(device)
    if dp is not None:
        model = GradSampleModule(peft_model, batch_first=True, loss_reduction="mean")
        # secure_mode: each noise value is a sum of four Gaussian draws, so the floating-point
        # attack on a single draw (Mironov 2012; arXiv 2107.10138) does not recover the noise.
        optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise,
            secure_mode=True,
        )
    peft_model.train()
    losses: list[float] = []
    sampled = 0
    taken = 0
    try:
        for indices in sampler:
            if indices:
                ids, mask = collate([examples[i] for i in indices], pad_id, device)
                loss = unit_losses(model, ids, mask)[0].mean()
                losses.append(loss.item())
            else:
                # An empty Poisson batch must still release pure noise, as the analysis
                # assumes: zero-weighted dummy example, so clipping sums to 0 and noise is added.
                ids, mask = collate([examples[0]], pad_id, device)
                loss = unit_losses(model, ids, mask)[0].mean() * 0.0
            sampled += len(indices)
            with warnings.catch_warnings():
                # Opacus's hooks fire on module outputs because the frozen base needs no input grads.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            # Fresh OS entropy for every step: recovering one step's generator state reveals no other step.
            noise.manual_seed(secrets.randbits(64))
            if clip_batch:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            taken += 1
    finally:
        if dp is not None:
            model._close()  # remove Opacus hooks so the cached model can be wrapped again
        peft_model.eval()
    trained = adapter_state(peft_model)
    update = OrderedDict((k, trained[k] - received[k]) for k in keys)
    return LocalTrainResult(
        update=update,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        steps=taken,
        units_sampled=sampled,
    )


@torch.no_grad()
def heldout_loss(peft_model, examples: Sequence[Sequence[int]], *, batch_size: int, pad_id: int) -> tuple[float, int]:
    """Summed next-token loss and number of predicted tokens over `examples`."""
    device = next(peft_model.parameters()).device
    peft_model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask = collate(examples[start : start + batch_size], pad_id, device)
        _, loss_sum, count = unit_losses(peft_model, ids, mask)
        total += loss_sum.sum().item()
        tokens += int(count.sum().item())
    return total, tokens


def collate(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, x in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return ids.to(device), mask.to(device)


def unit_losses(model, ids: torch.Tensor, mask: torch.Tensor):
    """Per-unit mean token loss (what DP-SGD clips), per-unit summed loss and token counts.

    Each unit's loss depends on its own tokens only, so a unit's clipped gradient cannot
    be scaled by what else is in the batch.
    """
    # No key/value cache: nothing is generated here, and the cache would hold every layer's keys and values.
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:]
    weight = mask[:, 1:].float()
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * weight
    summed = token_loss.sum(dim=1)
    counts = weight.sum(dim=1)
    return summed / counts.clamp(min=1.0), summed, counts
