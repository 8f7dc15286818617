"""Fences and quantile sets of one column: exact against numpy/scipy, private against exact."""

import numpy as np
import pytest
import scipy.stats

from keras_safe.preprocessing import fences


def test_exact_fences_match_their_textbook_definitions():
    column = np.random.default_rng(0).lognormal(size=501)
    q1, q3 = np.percentile(column, [25, 75])
    assert fences.exact_fences(column, "iqr", 3.0, (0.01, 0.99), 5.0) == pytest.approx(
        (q1 - 3.0 * (q3 - q1), q3 + 3.0 * (q3 - q1))
    )
    assert fences.exact_fences(column, "quantile", 0.0, (0.05, 0.9), 1.0) == pytest.approx(
        tuple(np.percentile(column, [5, 90]))
    )
    mad = scipy.stats.median_abs_deviation(column, scale="normal")
    med = np.median(column)
    assert fences.exact_fences(column, "mad", 0.0, (0.0, 1.0), 2.0) == pytest.approx(
        (med - 2.0 * mad, med + 2.0 * mad)
    )
    assert fences.exact_quantiles(column, (0.1, 0.5)) == pytest.approx(
        tuple(np.percentile(column, [10, 50]))
    )


def test_private_quantiles_are_sorted_and_spend_an_equal_share_each():
    """With one value per interval the mechanism is known in closed form: compare frequencies.

    For the data {1, 2, 3} on [0, 4] (intervals of length 1), the median's exponential
    mechanism picks interval i with probability proportional to exp(-eps * |i - 1.5| / 2).
    `private_quantiles` with three levels gives each quantile eps / 3.
    """
    column = np.array([1.0, 2.0, 3.0])
    eps = 3.0
    rng = np.random.default_rng(0)
    medians = []
    for _ in range(4000):
        low, mid, high = fences.private_quantiles(column, (0.5, 0.5, 0.5), 0.0, 4.0, eps, rng)
        assert low <= mid <= high
        medians.append(mid)
    # The middle of three sorted draws, each with eps / 3: compare its interval frequencies
    # with the order statistic of three independent draws from the closed form.
    weights = np.exp(-(eps / 3) * np.abs(np.arange(4) - 1.5) / 2)
    p = weights / weights.sum()
    cdf = np.cumsum(p)
    median_cdf = 3 * cdf**2 - 2 * cdf**3  # P(middle of three <= k)
    expected = np.diff(np.concatenate([[0.0], median_cdf]))
    counts = np.bincount(np.floor(medians).astype(int), minlength=4)
    assert scipy.stats.chisquare(counts, expected * len(medians)).pvalue > 1e-3
    # Against a budget of eps per quantile (no split), the test has power.
    loose = np.exp(-eps * np.abs(np.arange(4) - 1.5) / 2)
    loose_cdf = np.cumsum(loose / loose.sum())
    wrong = np.diff(np.concatenate([[0.0], 3 * loose_cdf**2 - 2 * loose_cdf**3]))
    assert scipy.stats.chisquare(counts, wrong * len(medians)).pvalue < 1e-3


@pytest.mark.parametrize("method", ["iqr", "quantile", "zscore", "mad"])
def test_private_fences_approach_the_exact_ones(method):
    column = np.random.default_rng(1).normal(size=20000)
    exact = fences.exact_fences(column, method, 1.5, (0.05, 0.95), 3.0)
    private = fences.private_fences(
        column, method, 1.5, (0.05, 0.95), 3.0, -10.0, 10.0, 1.0, np.random.default_rng(2)
    )
    np.testing.assert_allclose(private, exact, atol=0.1)


def test_argument_checks():
    assert fences.check_fence_args("mad", 0, [0.0, 1.0], 1) == ("mad", 0.0, (0.0, 1.0), 1.0)
    for bad in [(0.5, 0.5), (-0.1, 0.5), (0.2,), "ab", None]:
        with pytest.raises(ValueError, match="`quantile_range` must be a pair"):
            fences.check_quantile_range(bad)
    with pytest.raises(ValueError, match="`method` must be one of 'iqr', 'quantile'"):
        fences.check_fence_args("sigma", 1.5, (0.0, 1.0), 3.0)
    with pytest.raises(ValueError, match="`iqr_factor` must be"):
        fences.check_fence_args("iqr", np.nan, (0.0, 1.0), 3.0)
    with pytest.raises(ValueError, match="`z` must be"):
        fences.check_fence_args("iqr", 1.5, (0.0, 1.0), -3.0)
