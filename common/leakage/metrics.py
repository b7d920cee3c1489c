"""The numbers of a memorisation audit, as plain functions of scores.

- Exposure (Carlini et al. 2019): log2|R| - log2 rank of the canary among its candidate space,
  with the rank extrapolated from a skew-normal fit of sampled candidates' log-perplexities when
  the space is too large to enumerate.
- Membership inference: ROC AUC and TPR at a fixed FPR (scikit-learn).
- One-run auditing (Steinke, Nasr, Jagielski 2023): a (eps, delta)-DP mechanism makes each of r
  membership guesses right with probability at most e^eps / (1 + e^eps), independently enough that
  the number right is dominated by a binomial; the largest eps that the observed count rejects at
  confidence 1 - beta is an empirical lower bound on eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def exposure_exact(canary_score: float, candidate_scores: Sequence[float]) -> float:
    """Exposure when every candidate was scored: log2 |R| - log2 rank (1 = most likely)."""
    scores = np.asarray(candidate_scores, dtype=float)
    rank = 1 + int(np.count_nonzero(scores < canary_score))
    return math.log2(len(scores)) - math.log2(rank)


def exposure_extrapolated(canary_score: float, sampled_scores: Sequence[float], space_size: int) -> float:
    """Exposure from a skew-normal fit of sampled candidates (lower score = more likely).

    -log2 of the fitted probability that a random candidate scores at most the canary, capped
    at log2 |R| (no canary can rank above first).
    """
    from scipy.stats import skewnorm

    params = skewnorm.fit(np.asarray(sampled_scores, dtype=float))
    tail = float(skewnorm.cdf(canary_score, *params))
    floor = 1.0 / space_size
    return -math.log2(max(tail, floor))


def membership_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of 'higher score means member'."""
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float = 0.01) -> float:
    """True-positive rate at the largest threshold whose false-positive rate is at most `fpr`."""
    from sklearn.metrics import roc_curve

    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    fprs, tprs, _ = roc_curve(labels, list(member_scores) + list(nonmember_scores))
    allowed = fprs <= fpr
    return float(tprs[allowed].max()) if allowed.any() else 0.0


def one_run_guesses(scores: Sequence[float], included: Sequence[bool], guesses: int) -> tuple[int, int]:
    """Guess 'in' for the top guesses/2 scores and 'out' for the bottom guesses/2; return (guesses, correct)."""
    order = np.argsort(np.asarray(scores, dtype=float))
    half = min(guesses // 2, len(order) // 2)
    out_guesses, in_guesses = order[:half], order[len(order) - half :]
    correct = sum(bool(included[i]) for i in in_guesses) + sum(not included[i] for i in out_guesses)
    return 2 * half, int(correct)


def epsilon_lower_bound(guesses: int, correct: int, beta: float = 0.05) -> float:
    """Largest eps such that Binomial(guesses, e^eps/(1+e^eps)) reaching `correct` has probability <= beta."""
    from scipy.stats import binom

    if guesses == 0 or correct <= guesses / 2:
        return 0.0

    def rejected(eps: float) -> bool:
        p = math.exp(eps) / (1 + math.exp(eps))
        return float(binom.sf(correct - 1, guesses, p)) <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi) and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo
