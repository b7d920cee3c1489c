"""Epsilon of a DP-SGD history and noise for a target epsilon (Opacus's RDP accountant).

RDP is a slightly loose but robust upper bound; tests cross-check it against Google's
dp-accounting on the same (q, sigma, steps, delta).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.errors import PrivacyError


@dataclass(frozen=True)
class DpSgdSteps:
    """`steps` DP-SGD steps at Poisson sampling rate `sample_rate` with noise `noise_multiplier`."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_spent(history: Sequence[DpSgdSteps], delta: float) -> float:
    """Cumulative epsilon at `delta` of every step in `history` (0 for an empty history).

    Steps with noise_multiplier 0 are non-private training: no finite epsilon holds after them.
    """
    if not history:
        return 0.0
    if any(h.noise_multiplier == 0 for h in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history]
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is still valid, only looser.
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma (to 1%) whose `steps` steps at `sample_rate` spend at most `target_epsilon`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                )
            )
    except ValueError as err:
        raise PrivacyError(
            f"No noise multiplier reaches epsilon={target_epsilon} at delta={delta} for {steps} "
            f"steps at sampling rate {sample_rate:.4g} ({err}). Raise privacy.target_epsilon, "
            "or lower federation.rounds, federation.local_steps or federation.batch_size."
        ) from err
