"""Epsilon of a DP-SGD history, and the noise for a target epsilon.

The accountant is the privacy loss distribution (PLD) of the Poisson-subsampled Gaussian from Google's
dp-accounting, rounded pessimistically: an upper bound on the true epsilon, 7-40% below Opacus's RDP bound at
the epsilons we use. RDP stays as an independent cross-check (`epsilon_rdp`). Every argument may come from a
deviating coordinator, so every entry point validates it first, and every search is bounded.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

from dp_accounting.pld import privacy_loss_distribution, privacy_loss_mechanism
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution
from opacus.accountants import RDPAccountant

from common.errors import PrivacyError

# (noise_multiplier, sample_rate, steps) with every step of one (sigma, q) pair merged, sorted.
Segments = tuple[tuple[float, float, int], ...]

# The PLD's discretisation interval is relative to the epsilon it measures. It starts at an RDP bound taken at
# integer orders only (exact finite sums, fast at any sigma; fractional orders take seconds at large sigma) over
# _COARSE_POINTS, and each refinement divides it by at least _REFINE, or sets it to the last estimate over
# _COARSE_POINTS when RDP was far too loose. Intervals are powers of two, so nearby histories share cached
# distributions. Pessimistic rounding only ever overestimates, and the excess shrinks about with the square of
# the interval: once two successive estimates agree within _AGREE, the finer one is within about _AGREE / 15
# (0.13%) of the true epsilon, well inside the 1% the tests hold it to against dp-accounting at intervals 10x
# finer. _MAX_REFINEMENTS bounds the work; should it run out, the estimate is still an upper bound, only looser.
_COARSE_POINTS = 256
_REFINE = 4
_AGREE = 0.02
_MAX_REFINEMENTS = 5
# dp-accounting builds one step's distribution point by point in Python (about 20 us a point), so the interval
# never goes below the width of one step's loss range over _MAX_POINTS. Only epsilons under ~0.01 at small q
# meet that floor; their epsilon is then a looser upper bound.
_MAX_POINTS = 2**15
_SCALE_ORDERS = tuple(range(2, 17)) + (20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
# Beyond this RDP bound no budget applies and the PLD's intervals would grow until exp() overflows: Opacus's
# RDP epsilon, also an upper bound, is the answer there.
_PLD_CEILING = 1000.0
# Segments longer than this self-compose in two stages: see _segment_pld.
_TWO_STAGES_ABOVE = 10**4
_FIRST_STAGE = 16

# Below 0.01 a single step costs epsilon in the thousands: no DP claim means that, so the value is refused as
# hostile or corrupt. Zero stays legal: it records training without DP (infinite epsilon).
MIN_NOISE_MULTIPLIER = 0.01
# No target needs more: at sigma 1e4 even a full-batch step costs epsilon about 1e-4. The noise search stops here.
MAX_NOISE_MULTIPLIER = 1e4
# More DP-SGD steps than a fine-tuning run takes (a thousand rounds of a thousand local steps); the bound keeps a
# hostile plan from holding a node for minutes.
MAX_STEPS = 10**6
# A batch of one from a trillion units; below, dp-accounting's loss arithmetic underflows (at 1e-310).
MIN_SAMPLE_RATE = 1e-12
# The PLD counts the tails it truncates (about 1e-15 of mass per composition) as infinite loss, so a delta near
# that would read as infinite epsilon; no policy needs a delta that small.
MIN_DELTA = 1e-10
# Adding steps never lowers the true epsilon, but the PLD's estimate can dip: by floating-point noise of the FFT
# (about 1e-12 when the added step is almost no-op) or by a change of interval (within the estimate's 1%). A fall
# larger than this fraction means a broken accountant.
MONOTONE_SLACK = 0.01
# The noise search stops when its bracket is this narrow: the returned sigma is within 0.5% of the smallest.
_NOISE_TOLERANCE = 1.005
_MAX_SEARCH_STEPS = 64


@dataclass(frozen=True)
class DpSgdSteps:
    """`steps` DP-SGD steps at Poisson sampling rate `sample_rate` with noise `noise_multiplier`."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_spent(history: Sequence[DpSgdSteps], delta: float) -> float:
    """Cumulative epsilon at `delta` of every step in `history` (PLD), 0 for an empty history.

    Steps with noise_multiplier 0 are non-private training: no finite epsilon holds after them.
    """
    segments = _segments(history, delta)
    if segments is None:
        return math.inf
    return _pld_epsilon(segments, float(delta)) if segments else 0.0


def epsilon_rdp(history: Sequence[DpSgdSteps], delta: float) -> float:
    """The same epsilon from Opacus's RDP accountant: a looser upper bound, kept as an independent check."""
    segments = _segments(history, delta)
    if segments is None:
        return math.inf
    return _rdp_epsilon(segments, float(delta)) if segments else 0.0


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma (to 0.5%) whose `steps` steps at `sample_rate` spend at most `target_epsilon` (PLD)."""
    _check_delta(delta)
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(
            f"target_epsilon={target_epsilon!r} is not a finite number above 0: no noise reaches it. "
            "Set privacy.target_epsilon to a positive number, or set privacy.noise_multiplier instead."
        )
    _check_sample_rate(sample_rate, "noise_for_target")
    _check_steps(steps, "noise_for_target")
    if steps < 1:
        raise PrivacyError(
            f"steps={steps} in noise_for_target: the noise for a target epsilon needs at least 1 planned step. "
            "Plan federation.rounds and federation.local_steps of at least 1."
        )
    return _noise_for_target(float(target_epsilon), float(delta), float(sample_rate), int(steps))


# -- validation: every value is checked before any accountant sees it ------------------------------------------
def _is_real(value: object) -> TypeGuard[float]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_delta(delta: object) -> None:
    if not _is_real(delta) or not MIN_DELTA <= delta < 1:
        raise PrivacyError(
            f"delta={delta!r} is not a probability from {MIN_DELTA:g} up to (not including) 1, so this accountant "
            "states no (epsilon, delta) guarantee for it. Set privacy.delta below 1 / (number of privacy units) "
            f"and at least {MIN_DELTA:g}, e.g. 1e-5."
        )


def _check_sample_rate(rate: object, where: str) -> None:
    if not _is_real(rate) or not MIN_SAMPLE_RATE <= rate <= 1:
        raise PrivacyError(
            f"sample_rate={rate!r} in {where} is not a Poisson sampling rate from {MIN_SAMPLE_RATE:g} to 1. "
            "The rate is federation.batch_size / privacy units on the node; refuse a plan that implies another."
        )


def _check_steps(steps: object, where: str) -> None:
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 0 <= int(steps) <= MAX_STEPS:
        raise PrivacyError(
            f"steps={steps!r} in {where} is not a whole number of DP-SGD steps from 0 to {MAX_STEPS}. "
            "Plan federation.local_steps and federation.rounds as integers whose product is within that limit."
        )


def _check_noise(sigma: object, where: str) -> None:
    if not _is_real(sigma) or not (sigma == 0 or MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER):
        raise PrivacyError(
            f"noise_multiplier={sigma!r} in {where} is neither 0 (training without DP) nor a number from "
            f"{MIN_NOISE_MULTIPLIER} to {MAX_NOISE_MULTIPLIER:g}. Refuse a plan that sets it; a ledger that holds "
            "it is corrupt and must not be trusted."
        )


def _segments(history: Sequence[DpSgdSteps], delta: float) -> Segments | None:
    """The history validated and merged per (sigma, q); None when a step trained without noise."""
    _check_delta(delta)
    merged: Counter[tuple[float, float]] = Counter()
    private = True
    for i, h in enumerate(history):
        where = f"history segment {i}"
        _check_noise(h.noise_multiplier, where)
        _check_sample_rate(h.sample_rate, where)
        _check_steps(h.steps, where)
        private = private and h.noise_multiplier != 0
        merged[float(h.noise_multiplier), float(h.sample_rate)] += int(h.steps)
    if not private:
        return None
    total = sum(merged.values())
    if total > MAX_STEPS:
        raise PrivacyError(
            f"The history holds {total} DP-SGD steps, more than the {MAX_STEPS} this accountant admits. "
            "A run this long is not a fine-tuning run; check the ledger and the plans that charged it."
        )
    # Composition is commutative, so one canonical order lets every equal history share a cached result.
    return tuple(sorted((sigma, q, steps) for (sigma, q), steps in merged.items() if steps))


# -- the accountants -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(segments: Segments, delta: float, orders: tuple[float, ...] | None = None) -> float:
    accountant = RDPAccountant()
    accountant.history = list(segments)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is still valid, only looser.
        warnings.simplefilter("ignore", UserWarning)
        epsilon = accountant.get_epsilon(delta, alphas=list(orders) if orders else None)
    # Near delta = 1 the RDP conversion goes negative; no guarantee is weaker than epsilon 0.
    return max(0.0, float(epsilon))


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(segments: Segments, delta: float) -> float:
    bound = _rdp_epsilon(segments, delta, _SCALE_ORDERS)
    if bound > _PLD_CEILING:
        return _rdp_epsilon(segments, delta)
    if bound == 0:
        return 0.0
    width = max(_loss_width(sigma, q) for sigma, q, _ in segments)
    finest = 2.0 ** math.ceil(math.log2(width / _MAX_POINTS)) if width > 0 else 0.0
    interval = max(finest, _power_of_two_below(bound / _COARSE_POINTS))
    coarse = _pld_epsilon_at(segments, delta, interval)
    for _ in range(_MAX_REFINEMENTS):
        if coarse == 0 or interval == finest:
            return coarse  # a pessimistic 0 leaves nothing to refine
        interval = max(finest, _power_of_two_below(min(interval / _REFINE, coarse / _COARSE_POINTS)))
        fine = _pld_epsilon_at(segments, delta, interval)
        if coarse - fine <= _AGREE * fine:
            return fine
        coarse = fine
    return coarse


def _power_of_two_below(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


@functools.lru_cache(maxsize=4096)
def _loss_width(sigma: float, q: float) -> float:
    """Width of the privacy loss range dp-accounting discretises for one step (the wider adjacency)."""
    widths = []
    for adjacency in (privacy_loss_mechanism.AdjacencyType.ADD, privacy_loss_mechanism.AdjacencyType.REMOVE):
        loss = privacy_loss_mechanism.GaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=adjacency)
        tail = loss.privacy_loss_tail()
        widths.append(abs(loss.privacy_loss(tail.lower_x_truncation) - loss.privacy_loss(tail.upper_x_truncation)))
    return max(widths)


def _pld_epsilon_at(segments: Segments, delta: float, interval: float) -> float:
    composed = _segment_pld(*segments[0], interval)
    for segment in segments[1:]:
        composed = composed.compose(_segment_pld(*segment, interval))
    return float(composed.get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=128)
def _segment_pld(sigma: float, q: float, steps: int, interval: float) -> PrivacyLossDistribution:
    """`steps` Poisson-subsampled Gaussian steps, rounded pessimistically (never below the true loss)."""
    single = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        sampling_prob=q,
        pessimistic_estimate=True,
        value_discretization_interval=interval,
    )
    if steps <= _TWO_STAGES_ABOVE:
        return single.self_compose(steps)
    # dp-accounting sizes a sparse self-composition as size**steps, a Python integer that alone takes seconds at
    # 1e6 steps. _FIRST_STAGE steps make any distribution of 2 or more points dense (over its 1000-point sparse
    # limit), and a dense one self-composes by one FFT.
    composed = single.self_compose(_FIRST_STAGE).self_compose(steps // _FIRST_STAGE)
    rest = steps % _FIRST_STAGE
    return composed.compose(single.self_compose(rest)) if rest else composed


@functools.lru_cache(maxsize=256)
def _noise_for_target(target: float, delta: float, q: float, steps: int) -> float:
    def spends(sigma: float) -> float:
        return _pld_epsilon(((sigma, q, steps),), delta)

    # spends(low) > target >= spends(high), except at the ends of the range, which are checked last.
    low, high = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    sigma = 1.0  # most targets need a sigma near 1: walk from there by factors of 2, then bisect in log space
    for _ in range(_MAX_SEARCH_STEPS):
        if spends(sigma) > target:
            low = sigma
        else:
            high = sigma
        if high / low <= _NOISE_TOLERANCE:
            break
        wide = high / low > 4
        sigma = (sigma * 2 if sigma == low else sigma / 2) if wide else math.sqrt(low * high)
    if high == MAX_NOISE_MULTIPLIER and spends(high) > target:
        raise PrivacyError(
            f"No noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps {steps} steps at sampling rate {q:.4g} "
            f"within epsilon={target:g} at delta={delta:g}. Raise privacy.target_epsilon, or lower "
            "federation.rounds, federation.local_steps or federation.batch_size."
        )
    if low == MIN_NOISE_MULTIPLIER and spends(low) <= target:
        return low
    return high
