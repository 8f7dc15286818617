"""Tests of keras_safe.accounting.group: user-level epsilon by RDP group privacy.

The reference is written out here: the example-level RDP curve from dp_accounting's accountant
(its public `rdp` values), Mironov 2017's group rule (Prop. 2: a group of `2**c` is
`(a, 3**c * rdp(2**c * a))`-RDP for orders `a >= 2`) applied by hand, and dp_accounting's
`compute_epsilon` conversion; a second reference computes integer-order RDP with scipy only.
"""

import math

import dp_accounting
import numpy as np
import pytest
from scipy.special import gammaln, logsumexp

from keras_safe._validation import ArgumentError
from keras_safe.accounting.accountants import RDP_ORDERS
from keras_safe.accounting.group import (
    MAX_GROUP_SIZE,
    group_epsilon,
    group_epsilon_of_segments,
)
from tests import dp_reference

DELTA = 1e-5
SETTINGS = (1.1, 0.01, 1000)  # noise multiplier, sampling rate, steps


# --- independent references ------------------------------------------------------------------


def _rdp_curve(orders, segments):
    """dp_accounting's RDP of Poisson-subsampled Gaussian segments at `orders`."""
    accountant = dp_accounting.rdp.RdpAccountant(list(orders))
    for noise, rate, steps in segments:
        step = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return accountant.rdp


def _reference_group_epsilon(segments, k, delta, orders=RDP_ORDERS):
    """Mironov 2017, Prop. 2, written out: c = ceil(log2 k); group RDP at order a >= 2 is
    3**c times the example-level RDP at order 2**c * a; then dp_accounting's conversion."""
    c = math.ceil(math.log2(k))
    kept = list(orders) if c == 0 else [a for a in orders if a >= 2]
    group_rdp = [3**c * r for r in _rdp_curve([2**c * a for a in kept], segments)]
    return dp_accounting.rdp.compute_epsilon(kept, group_rdp, delta)[0]


def _scipy_rdp(q, sigma, alpha):
    """RDP of one Poisson-sampled Gaussian step at an integer order (Mironov, Talwar and Zhang
    2019, Sec. 3.3): log(sum_j C(alpha, j) (1-q)^(alpha-j) q^j exp((j^2 - j)/(2 sigma^2)))
    / (alpha - 1), in log space with scipy."""
    j = np.arange(alpha + 1)
    log_binom = gammaln(alpha + 1) - gammaln(j + 1) - gammaln(alpha - j + 1)
    terms = log_binom + (alpha - j) * np.log1p(-q) + j * np.log(q) + (j * j - j) / (2 * sigma**2)
    return logsumexp(terms) / (alpha - 1)


def _scipy_group_epsilon(sigma, q, steps, k, delta, orders):
    """Group epsilon with no dp_accounting at all: scipy RDP at integer orders, Prop. 2, and
    Canonne, Kamath and Steinke 2020's conversion (Prop. 12) written out."""
    c = math.ceil(math.log2(k))
    best = math.inf
    for a in orders:
        rdp = 3**c * steps * _scipy_rdp(q, sigma, 2**c * a)
        best = min(best, rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return best


# --- the figure ------------------------------------------------------------------------------


def test_group_size_one_is_the_ordinary_rdp_epsilon():
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    step = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, 1000))
    ordinary = accountant.get_epsilon(DELTA)
    assert group_epsilon(*SETTINGS, 1, DELTA) == ordinary
    # and the reference's own grid, written out independently of keras_safe's constant
    assert group_epsilon(*SETTINGS, 1, DELTA) == pytest.approx(
        dp_reference.epsilon(*SETTINGS, DELTA), rel=1e-9
    )


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_matches_the_group_rule_applied_to_dp_accounting_rdp(k):
    # 2, 4, 8: powers of two; 3 and 5: rounded up to the next power of two (c = 2, 3).
    expected = _reference_group_epsilon([SETTINGS], k, DELTA)
    assert group_epsilon(*SETTINGS, k, DELTA) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("k", [2, 6])
def test_matches_a_reference_without_dp_accounting(k):
    orders = list(range(2, 33))
    expected = _scipy_group_epsilon(3.0, 0.02, 500, k, DELTA, orders)
    assert group_epsilon(3.0, 0.02, 500, k, DELTA, orders=orders) == pytest.approx(
        expected, rel=1e-9
    )


def test_figures_of_the_docstring():
    # noise 1.1, rate 0.01, 1000 steps: example-level 1.7118; groups 2, 4, 8 beside k * eps
    one = group_epsilon(*SETTINGS, 1, DELTA)
    assert one == pytest.approx(1.71177, abs=1e-5)
    figures = [group_epsilon(*SETTINGS, k, DELTA) for k in (2, 4, 8)]
    assert figures == pytest.approx([4.61935, 13.77368, 45905.448], rel=1e-5)


def test_grows_with_the_group_and_equals_within_one_power_of_two():
    eps = [group_epsilon(3.0, 0.01, 1000, k, DELTA) for k in range(1, 10)]
    assert all(b >= a for a, b in zip(eps, eps[1:]))
    assert eps[0] < eps[1] < eps[3] < eps[7]  # k = 1, 2, 4, 8
    assert eps[2] == eps[3] and eps[4] == eps[7]  # 3 and 4 share c = 2; 5..8 share c = 3


def test_custom_orders():
    orders = [1.5, 2.0, 3.0, 4.5, 8.0, 16.0]
    for k in (1, 2, 4):
        expected = _reference_group_epsilon([SETTINGS], k, DELTA, orders)
        assert group_epsilon(*SETTINGS, k, DELTA, orders=orders) == pytest.approx(
            expected, rel=1e-9
        )
    # order 1.5 is used for one example only: for groups it is below Prop. 2's order 2
    assert group_epsilon(*SETTINGS, 2, DELTA, orders=[1.5, 2.0]) == group_epsilon(
        *SETTINGS, 2, DELTA, orders=[2.0]
    )


# --- segments --------------------------------------------------------------------------------


def test_two_segments_compose():
    segments = [(1.1, 0.01, 500), (2.0, 0.02, 300)]
    for k in (1, 2, 4):
        expected = _reference_group_epsilon(segments, k, DELTA)
        both = group_epsilon_of_segments(segments, k, DELTA)
        assert both == pytest.approx(expected, rel=1e-9)
        assert both > max(group_epsilon(*s, k, DELTA) for s in segments)


def test_a_run_split_in_two_segments_is_the_whole_run():
    whole = group_epsilon(*SETTINGS, 4, DELTA)
    halves = group_epsilon_of_segments([(1.1, 0.01, 400), (1.1, 0.01, 600)], 4, DELTA)
    assert halves == pytest.approx(whole, rel=1e-12)


def test_no_steps_no_noise_and_full_batches():
    assert group_epsilon(1.1, 0.01, 0, 4, DELTA) == 0.0
    assert group_epsilon_of_segments([], 4, DELTA) == 0.0
    assert group_epsilon(0.0, 0.01, 10, 4, DELTA) == math.inf
    assert group_epsilon_of_segments([(0.0, 0.01, 0), (1.1, 0.01, 1000)], 2, DELTA) == (
        group_epsilon(*SETTINGS, 2, DELTA)
    )
    # q = 1: the plain Gaussian mechanism, whose RDP is alpha * steps / (2 sigma^2) exactly
    # (Mironov 2017); the group rule then gives 3**c * 2**c * a * steps / (2 sigma^2).
    orders = [2.0, 3.0, 5.0, 10.0]
    expected = dp_accounting.rdp.compute_epsilon(
        orders, [9 * 4 * a * 10 / (2 * 5.0**2) for a in orders], DELTA
    )[0]
    assert group_epsilon(5.0, 1.0, 10, 4, DELTA, orders=orders) == pytest.approx(
        expected, rel=1e-12
    )


# --- argument checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"group_size": 0}, "`group_size`"),
        ({"group_size": 2.5}, "`group_size`"),
        ({"group_size": True}, "`group_size`"),
        ({"group_size": MAX_GROUP_SIZE + 1}, "`group_size`"),
        ({"delta": 0.0}, "`delta`"),
        ({"delta": 1.0}, "`delta`"),
        ({"noise_multiplier": -1.0}, "`noise_multiplier`"),
        ({"sampling_rate": 0.0}, "`sampling_rate`"),
        ({"sampling_rate": 1.5}, "`sampling_rate`"),
        ({"steps": -1}, "`steps`"),
        ({"steps": 1.5}, "`steps`"),
        ({"orders": []}, "`orders`"),
        ({"orders": [1.0, 2.0]}, "`orders`"),
        ({"orders": 8}, "`orders`"),
        ({"orders": [1.5], "group_size": 2}, "`orders`"),
    ],
)
def test_a_wrong_argument_is_named(kwargs, name):
    arguments = dict(noise_multiplier=1.1, sampling_rate=0.01, steps=100, group_size=2, delta=DELTA)
    arguments.update(kwargs)
    with pytest.raises(ArgumentError, match=name) as error:
        group_epsilon(**arguments)
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize(
    "segments, name",
    [
        (5, "`segments`"),
        ("abc", "`segments`"),
        ([(1.1, 0.01)], r"`segments\[0\]`"),
        ([(1.1, 0.01, 10), 7], r"`segments\[1\]`"),
        ([(1.1, 0.01, 10), (1.1, 2.0, 10)], r"`segments\[1\] sampling_rate`"),
        ([(-1.0, 0.01, 10)], r"`segments\[0\] noise_multiplier`"),
    ],
)
def test_a_wrong_segment_is_named(segments, name):
    with pytest.raises(ArgumentError, match=name):
        group_epsilon_of_segments(segments, 2, DELTA)
