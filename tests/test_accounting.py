"""The accountant: PLD epsilon against dp-accounting and against closed forms, RDP as the looser bound,
noise for a target, and hostile inputs refused before any accountant runs."""

import logging
import math

import dp_accounting
import pytest
from scipy import optimize, stats

from common.errors import PrivacyError
from common.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    MAX_STEPS,
    MONOTONE_SLACK,
    DpSgdSteps,
    epsilon_rdp,
    epsilon_spent,
    noise_for_target,
)

logging.getLogger("absl").setLevel(logging.ERROR)

# The default run: 32 of about 230 units per batch, 10 local steps, 5 rounds, sigma near what target 3 needs.
DEFAULT_ROUND = DpSgdSteps(1.7, 32 / 230, 10)
ABOVE_HALF = [
    ([DpSgdSteps(1.0, 0.06, 75)], 1e-5),
    ([DpSgdSteps(2.0, 0.01, 1000)], 1e-6),
    ([DpSgdSteps(0.8, 0.3, 10)], 1e-5),
    ([DEFAULT_ROUND] * 5, 1e-5),  # five rounds charged separately
    ([DpSgdSteps(1.0, 0.06, 20), DpSgdSteps(1.3, 0.05, 40), DpSgdSteps(0.9, 0.1, 10)], 1e-4),
    ([DpSgdSteps(1.0, 0.06, 20), DpSgdSteps(1.3, 0.05, 40), DpSgdSteps(1.0, 0.06, 20)], 1e-5),  # interleaved
]
BELOW_HALF = [
    ([DpSgdSteps(5.0, 0.01, 50)], 1e-5),  # epsilon about 0.04
    ([DpSgdSteps(10.0, 0.1, 10), DpSgdSteps(8.0, 0.05, 30)], 1e-5),  # epsilon about 0.2
]
SETTINGS = ABOVE_HALF + BELOW_HALF


def dp_accounting_pld(history, delta, interval):
    """dp-accounting's own PLD accountant, one event per segment as given, at `interval`."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    for h in history:
        event = dp_accounting.PoissonSampledDpEvent(h.sample_rate, dp_accounting.GaussianDpEvent(h.noise_multiplier))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, h.steps))
    return accountant.get_epsilon(delta)


def dp_accounting_rdp(history, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    for h in history:
        event = dp_accounting.PoissonSampledDpEvent(h.sample_rate, dp_accounting.GaussianDpEvent(h.noise_multiplier))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, h.steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("history, delta", SETTINGS)
def test_epsilon_is_within_one_percent_above_dp_accounting_at_a_much_finer_interval(history, delta):
    ours = epsilon_spent(history, delta)
    # Ours stops at an interval of epsilon / 2048 or coarser: this is at least 12x finer.
    reference = dp_accounting_pld(history, delta, interval=ours * 4e-5)
    assert reference <= ours <= 1.01 * reference, (ours, reference)


def remove_delta(eps, sigma, q):
    """Exact delta(eps) of one Poisson-subsampled Gaussian step, removal direction: P = (1-q)N(0,s^2) + qN(1,s^2)
    against Q = N(0,s^2). P > e^eps Q exactly above x*, so the hockey stick is two Gaussian tails."""
    x = sigma**2 * math.log((math.expm1(eps) + q) / q) + 0.5
    return (1 - q - math.exp(eps)) * stats.norm.sf(x / sigma) + q * stats.norm.sf((x - 1) / sigma)


def add_delta(eps, sigma, q):
    """The same for the addition direction, Q against P: Q > e^eps P exactly below x'."""
    inner = math.exp(-eps) - 1 + q
    if inner <= 0:
        return 0.0
    x = sigma**2 * math.log(inner / q) + 0.5
    return stats.norm.cdf(x / sigma) - math.exp(eps) * (
        (1 - q) * stats.norm.cdf(x / sigma) + q * stats.norm.cdf((x - 1) / sigma)
    )


def exact_epsilon(delta_of_eps, delta):
    return optimize.brentq(lambda eps: delta_of_eps(eps) - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 1, 1e-5), (3.0, 1, 1e-5), (0.7, 1, 1e-8), (4.0, 16, 1e-5)])
def test_full_batch_epsilon_is_at_least_the_gaussian_mechanisms_and_within_one_percent(sigma, steps, delta):
    # Balle & Wang 2018: the Gaussian mechanism at sensitivity 1 has delta(eps) = Phi(1/(2s) - eps s)
    # - e^eps Phi(-1/(2s) - eps s), exactly. `steps` full-batch steps at sigma are one step at sigma / sqrt(steps).
    s = sigma / math.sqrt(steps)
    exact = exact_epsilon(
        lambda eps: stats.norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * stats.norm.cdf(-1 / (2 * s) - eps * s),
        delta,
    )
    ours = epsilon_spent([DpSgdSteps(sigma, 1.0, steps)], delta)
    assert exact <= ours <= 1.01 * exact, (ours, exact)


@pytest.mark.parametrize("sigma, q", [(0.8, 0.3), (1.0, 0.14), (0.6, 0.05), (2.0, 0.5)])
def test_one_subsampled_step_is_at_least_its_exact_epsilon_and_within_one_percent(sigma, q):
    delta = 1e-5
    exact = max(
        exact_epsilon(lambda e: remove_delta(e, sigma, q), delta),
        exact_epsilon(lambda e: add_delta(e, sigma, q), delta) if add_delta(0.0, sigma, q) > delta else 0.0,
    )
    ours = epsilon_spent([DpSgdSteps(sigma, q, 1)], delta)
    assert exact <= ours <= 1.01 * exact, (ours, exact)


@pytest.mark.parametrize("history, delta", SETTINGS)
def test_pld_is_below_rdp(history, delta):
    assert epsilon_spent(history, delta) < epsilon_rdp(history, delta)


# Opacus's orders stop at 63, so below epsilon ~0.5 its RDP is looser than dp-accounting's; above, they agree.
@pytest.mark.parametrize("history, delta", ABOVE_HALF)
def test_rdp_agrees_with_dp_accounting_rdp(history, delta):
    ours, google = epsilon_rdp(history, delta), dp_accounting_rdp(history, delta)
    assert abs(ours - google) <= 0.02 * google, (ours, google)


def test_epsilon_of_nothing_is_zero_and_of_no_noise_is_infinite():
    assert epsilon_spent([], 1e-5) == 0.0 and epsilon_rdp([], 1e-5) == 0.0
    no_noise = [DpSgdSteps(1.0, 0.1, 10), DpSgdSteps(0.0, 0.1, 1)]
    assert math.isinf(epsilon_spent(no_noise, 1e-5)) and math.isinf(epsilon_rdp(no_noise, 1e-5))


def test_order_and_splitting_of_the_history_do_not_change_epsilon():
    a, b = DpSgdSteps(1.0, 0.06, 20), DpSgdSteps(1.3, 0.05, 40)
    whole = epsilon_spent([DpSgdSteps(1.0, 0.06, 40), b], 1e-5)
    assert epsilon_spent([a, b, a], 1e-5) == whole
    assert epsilon_spent([b, a, DpSgdSteps(1.0, 0.06, 0), a], 1e-5) == whole
    assert epsilon_spent([a, b], 1e-5) < whole  # and more steps do cost more


@pytest.mark.parametrize("past", [[DpSgdSteps(1.0, 0.1, 17)], [DEFAULT_ROUND] * 3, SETTINGS[4][0]])
@pytest.mark.parametrize("added", [DpSgdSteps(1e4, 1e-6, 1), DpSgdSteps(50.0, 0.01, 1), DpSgdSteps(1.7, 0.14, 1)])
def test_adding_steps_lowers_epsilon_by_at_most_the_slack(past, added):
    before, after = epsilon_spent(past, 1e-5), epsilon_spent(past + [added], 1e-5)
    assert after >= before * (1 - MONOTONE_SLACK), (before, after)


@pytest.mark.parametrize(
    "target, delta, q, steps",
    [(3.0, 1e-5, 32 / 230, 50), (1.0, 1e-5, 0.08, 50), (0.3, 1e-6, 0.01, 1000), (8.0, 1e-5, 0.5, 5)],
)
def test_noise_for_target_is_the_smallest_sigma_within_one_percent(target, delta, q, steps):
    sigma = noise_for_target(target, delta, q, steps)
    assert epsilon_spent([DpSgdSteps(sigma, q, steps)], delta) <= target
    assert epsilon_spent([DpSgdSteps(0.99 * sigma, q, steps)], delta) > target


def test_noise_for_target_needs_more_noise_for_less_epsilon_and_says_when_none_suffices():
    assert noise_for_target(1.0, 1e-5, 0.08, 50) > noise_for_target(3.0, 1e-5, 0.08, 50)
    with pytest.raises(PrivacyError, match=f"up to {MAX_NOISE_MULTIPLIER:g}.*epsilon=1e-06"):
        noise_for_target(1e-6, 1e-5, 0.5, 50)


NAN, INF = float("nan"), float("inf")
BAD_STEPS = [
    (DpSgdSteps(NAN, 0.1, 10), "noise_multiplier=nan"),
    (DpSgdSteps(INF, 0.1, 10), "noise_multiplier=inf"),
    (DpSgdSteps(-1.0, 0.1, 10), "noise_multiplier=-1.0"),
    (DpSgdSteps(0.001, 0.1, 10), "noise_multiplier=0.001"),
    (DpSgdSteps(True, 0.1, 10), "noise_multiplier=True"),
    (DpSgdSteps("1.0", 0.1, 10), "noise_multiplier='1.0'"),
    (DpSgdSteps(1.0, 0.0, 10), "sample_rate=0.0"),
    (DpSgdSteps(1.0, 1.5, 10), "sample_rate=1.5"),
    (DpSgdSteps(1.0, -0.1, 10), "sample_rate=-0.1"),
    (DpSgdSteps(1.0, NAN, 10), "sample_rate=nan"),
    (DpSgdSteps(1.0, INF, 10), "sample_rate=inf"),
    (DpSgdSteps(1.0, 5e-324, 10), "sample_rate=5e-324"),
    (DpSgdSteps(1.0, 0.1, -1), "steps=-1"),
    (DpSgdSteps(1.0, 0.1, 10.0), "steps=10.0"),
    (DpSgdSteps(1.0, 0.1, 2.5), "steps=2.5"),
    (DpSgdSteps(1.0, 0.1, True), "steps=True"),
    (DpSgdSteps(1.0, 0.1, MAX_STEPS + 1), f"steps={MAX_STEPS + 1}"),
]


@pytest.mark.parametrize("accountant", [epsilon_spent, epsilon_rdp])
@pytest.mark.parametrize("bad, named", BAD_STEPS)
def test_hostile_history_is_refused_naming_the_value(accountant, bad, named):
    with pytest.raises(PrivacyError, match=f"{named} in history segment 1"):
        accountant([DpSgdSteps(1.0, 0.1, 10), bad], 1e-5)


@pytest.mark.parametrize("accountant", [epsilon_spent, epsilon_rdp])
@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, NAN, INF, 1e-15, True])
def test_hostile_delta_is_refused_even_for_an_empty_history(accountant, delta):
    with pytest.raises(PrivacyError, match=f"delta={delta!r}"):
        accountant([], delta)


@pytest.mark.parametrize(
    "history, delta, limit, fix",
    [
        ([DpSgdSteps(NAN, 0.1, 10)], 1e-5, "from 0.01 to 10000", "Refuse a plan"),
        ([DpSgdSteps(1.0, 2.0, 10)], 1e-5, "from 1e-12 to 1", "federation.batch_size"),
        ([DpSgdSteps(1.0, 0.1, -1)], 1e-5, f"from 0 to {MAX_STEPS}", "federation.local_steps"),
        ([], 1.0, "at least 1e-10", "privacy.delta"),
    ],
)
def test_refusals_name_the_limit_and_the_fix(history, delta, limit, fix):
    with pytest.raises(PrivacyError) as err:
        epsilon_spent(history, delta)
    assert limit in str(err.value) and fix in str(err.value)


def test_a_history_longer_than_the_limit_is_refused():
    with pytest.raises(PrivacyError, match=f"{MAX_STEPS + 1} DP-SGD steps"):
        epsilon_spent([DpSgdSteps(1.0, 0.1, MAX_STEPS), DpSgdSteps(1.0, 0.1, 1)], 1e-5)


@pytest.mark.parametrize(
    "args, named",
    [
        ((NAN, 1e-5, 0.1, 50), "target_epsilon=nan"),
        ((INF, 1e-5, 0.1, 50), "target_epsilon=inf"),
        ((0.0, 1e-5, 0.1, 50), "target_epsilon=0.0"),
        ((-3.0, 1e-5, 0.1, 50), "target_epsilon=-3.0"),
        ((3.0, NAN, 0.1, 50), "delta=nan"),
        ((3.0, 1.0, 0.1, 50), "delta=1.0"),
        ((3.0, 1e-5, NAN, 50), "sample_rate=nan"),
        ((3.0, 1e-5, 0.0, 50), "sample_rate=0.0"),
        ((3.0, 1e-5, 2.0, 50), "sample_rate=2.0"),
        ((3.0, 1e-5, 0.1, 0), "steps=0"),  # Opacus's search never ended on this one
        ((3.0, 1e-5, 0.1, -5), "steps=-5"),
        ((3.0, 1e-5, 0.1, 50.0), "steps=50.0"),
        ((3.0, 1e-5, 0.1, True), "steps=True"),
        ((3.0, 1e-5, 0.1, MAX_STEPS + 1), f"steps={MAX_STEPS + 1}"),
    ],
)
def test_hostile_noise_request_is_refused_naming_the_value(args, named):
    with pytest.raises(PrivacyError, match=named):
        noise_for_target(*args)
