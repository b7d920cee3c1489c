"""The memorisation audit a node runs on the final model, on its own data and canaries.

Only numbers leave the node (and canary prompts with the secret blacked out); the canaries,
the records and the generated texts stay here.
"""

from __future__ import annotations

import math
import random
import secrets
from collections import defaultdict
from collections.abc import Sequence

import torch

from client.training import collate, unit_losses
from common.config import AuditConfig
from common.leakage.canaries import Canary, redact
from common.leakage.metrics import (
    exposure_extrapolated,
    membership_auc,
    one_run_guesses,
    tpr_at_fpr,
)
from common.pii import PiiDetector

# Prompts for sampling, in the genre of the regional data, plus unconditional samples.
PROMPTS = ("", "Customer:", "Account profile. Name:", "Hello, my name is", "Please update the delivery address")


@torch.no_grad()
def sequence_losses(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> list[float]:
    """Mean next-token loss of each text under `model` (lower = the model finds it more likely)."""
    examples = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    return example_losses(model, examples, tokenizer.pad_token_id, batch_size)


@torch.no_grad()
def example_losses(model, examples: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> list[float]:
    device = next(model.parameters()).device
    model.eval()
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        ids, mask = collate(examples[start : start + batch_size], pad_id, device)
        out.extend(unit_losses(model, ids, mask)[0].tolist())
    return out


def canary_losses(model, tokenizer, canary: Canary, candidates: int) -> tuple[float, list[float]]:
    """The canary's loss and the losses of random secrets of the same format after the same prefix."""
    rng = secrets.SystemRandom()
    others = [canary.random_secret(rng) for _ in range(candidates)]
    losses = sequence_losses(model, tokenizer, [canary.text] + [canary.with_secret(s) for s in others])
    return losses[0], losses[1:]


@torch.no_grad()
def extracted(model, tokenizer, canary: Canary, beams: int) -> bool:
    """Does decoding from the canary's prefix reproduce its secret verbatim?"""
    prompt = tokenizer(canary.prefix, return_tensors="pt").to(next(model.parameters()).device)
    secret_tokens = len(tokenizer(" " + canary.secret, add_special_tokens=False)["input_ids"])
    out = model.generate(
        **prompt,
        max_new_tokens=secret_tokens + 2,
        do_sample=False,
        num_beams=beams,
        pad_token_id=tokenizer.eos_token_id,
    )
    continuation = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    return canary.secret in continuation.replace(" ", "")


@torch.no_grad()
def sample_texts(model, tokenizer, n: int, max_new_tokens: int = 64) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = (
            tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else torch.tensor([[tokenizer.eos_token_id]])
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=50,
            pad_token_id=tokenizer.eos_token_id,
        )
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


def audit(
    model,
    tokenizer,
    *,
    canaries: Sequence[Canary],
    members: Sequence[Sequence[int]],
    nonmembers: Sequence[Sequence[int]],
    train_raw_texts: Sequence[str],
    settings: AuditConfig,
) -> tuple[dict[str, float], list[str]]:
    """All audit numbers for this node, and redacted canary prompts for the report."""
    metrics: dict[str, float] = {}
    examples: list[str] = []
    pad = tokenizer.pad_token_id

    # Exposure and extraction of the repeated canaries.
    by_reps: dict[int, list[tuple[float, bool, bool]]] = defaultdict(list)
    for canary in (c for c in canaries if c.kind == "exposure"):
        loss, others = canary_losses(model, tokenizer, canary, settings.exposure_candidates)
        exposure = exposure_extrapolated(loss, others, canary.space_size)
        greedy, beam = extracted(model, tokenizer, canary, 1), extracted(model, tokenizer, canary, 5)
        by_reps[canary.repetitions].append((exposure, greedy, beam))
        examples.append(
            f"{redact(canary)} [inserted {canary.repetitions}x; exposure {exposure:.1f} of "
            f"{math.log2(canary.space_size):.1f} possible bits; greedy {'EXTRACTED' if greedy else 'not extracted'}, "
            f"beam {'EXTRACTED' if beam else 'not extracted'}]"
        )
    for reps, rows in sorted(by_reps.items()):
        metrics[f"exposure-rep{reps}-mean"] = sum(r[0] for r in rows) / len(rows)
        metrics[f"exposure-rep{reps}-max"] = max(r[0] for r in rows)
        metrics[f"extracted-greedy-rep{reps}"] = sum(r[1] for r in rows)
        metrics[f"extracted-beam-rep{reps}"] = sum(r[2] for r in rows)
        metrics[f"canaries-rep{reps}"] = len(rows)

    # Membership inference: training records against held-out records of the same node.
    rng = random.Random(secrets.randbits(64))
    sample = rng.sample(list(members), min(settings.mia_members, len(members)))
    tuned_in, tuned_out = example_losses(model, sample, pad), example_losses(model, list(nonmembers), pad)
    with model.disable_adapter():
        base_in, base_out = example_losses(model, sample, pad), example_losses(model, list(nonmembers), pad)
    if sample and nonmembers:
        loss_in, loss_out = [-x for x in tuned_in], [-x for x in tuned_out]
        cal_in = [b - t for b, t in zip(base_in, tuned_in, strict=True)]
        cal_out = [b - t for b, t in zip(base_out, tuned_out, strict=True)]
        metrics.update(
            {
                "mia-loss-auc": membership_auc(loss_in, loss_out),
                "mia-loss-tpr-at-1pct-fpr": tpr_at_fpr(loss_in, loss_out, 0.01),
                "mia-calibrated-auc": membership_auc(cal_in, cal_out),
                "mia-calibrated-tpr-at-1pct-fpr": tpr_at_fpr(cal_in, cal_out, 0.01),
            }
        )
    metrics["mia-members"] = len(sample)
    metrics["mia-nonmembers"] = len(nonmembers)

    # One-run audit: canaries each inserted with probability 1/2. The score is the secret's exposure among random
    # secrets after the same prefix: for a canary left out, its secret is one more random draw, so its score
    # follows the null exactly whatever the prefix, and those canaries measure what "never seen" scores here.
    one_run = [c for c in canaries if c.kind == "one-run"]
    if one_run:
        bits = [
            exposure_extrapolated(*canary_losses(model, tokenizer, c, settings.one_run_candidates), c.space_size)
            for c in one_run
        ]
        included = [c.repetitions > 0 for c in one_run]
        guesses, correct = one_run_guesses(bits, included, guesses=round(len(one_run) * settings.one_run_guess_share))
        never = [b for b, inside in zip(bits, included, strict=True) if not inside]
        metrics.update(
            {
                "one-run-canaries": len(one_run),
                "one-run-guesses": guesses,
                "one-run-correct": correct,
                "one-run-repetitions": max((c.repetitions for c in one_run), default=1) or 1,
                "canaries-never-inserted": len(never),
                "exposure-never-inserted-mean": sum(never) / len(never) if never else 0.0,
            }
        )

    # Personal data in generated text, and how much of it is verbatim from this node's records.
    detector = PiiDetector()
    corpus = "\n".join(train_raw_texts)
    spans = [s for text in sample_texts(model, tokenizer, settings.generations) for s in detector.find(text)]
    metrics.update(
        {
            "generations": settings.generations,
            "pii-spans": len(spans),
            "pii-spans-verbatim-in-training": sum(1 for s in spans if len(s.text) >= 6 and s.text in corpus),
        }
    )
    return metrics, examples
