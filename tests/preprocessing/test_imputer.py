"""Imputer: exact statistics against numpy, constant fill and indicator, DP mean and median."""

import numpy as np
import pytest
import scipy.stats

from keras_safe.preprocessing import Imputer
from tests.preprocessing.references import exp_mechanism_cdf, lognormal_data, symmetric_data
from tests.testing import assert_config_round_trip


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_imputer_matches_nan_statistics(strategy):
    x = lognormal_data()
    rng = np.random.default_rng(1)
    x[rng.random(x.shape) < 0.2] = np.nan
    x[5, 1] = np.inf
    imputer = Imputer(strategy=strategy)
    imputer.adapt(x)
    masked = np.where(np.isfinite(x), x, np.nan)
    expected = np.nanmean(masked, axis=0) if strategy == "mean" else np.nanmedian(masked, axis=0)
    np.testing.assert_allclose(imputer.fill.numpy(), expected, rtol=1e-6)
    out = np.asarray(imputer(x))
    finite = np.isfinite(x)
    np.testing.assert_allclose(out[finite], x[finite], rtol=1e-6)
    np.testing.assert_allclose(out, np.where(finite, x, expected), rtol=1e-6)
    np.testing.assert_array_equal(imputer.missing_counts, (~finite).sum(axis=0))


def test_imputer_constant_and_indicator():
    x = np.array([[1.0, np.nan], [np.nan, np.nan], [-np.inf, 4.0]])
    imputer = Imputer(strategy="constant", fill_value=-7.0, add_indicator=True)
    imputer.adapt(x)  # an all-NaN column is fine for a constant
    out = np.asarray(imputer(x))
    assert out.shape == (3, 4)
    np.testing.assert_array_equal(out[:, :2], np.where(np.isfinite(x), x, -7.0))
    np.testing.assert_array_equal(out[:, 2:], (~np.isfinite(x)).astype("float32"))
    assert imputer.compute_output_shape((None, 2)) == (None, 4)
    assert imputer.dp_epsilon_spent == 0.0
    assert not imputer.uses_data
    assert_config_round_trip(imputer)


def test_dp_mean_noise_scale_matches_epsilon():
    # Budget: epsilon split over 2 features, then half to the centred sum (sensitivity
    # (hi - lo) / 2 = 5): Laplace scale 5 / (eps / 4) on the sum, divided by n for the mean.
    eps, n = 1.0, 10000
    x = symmetric_data(n)
    errors = []
    for seed in range(300):
        layer = Imputer(strategy="mean", dp_epsilon=eps, dp_bounds=(0.0, 10.0), seed=seed)
        layer.adapt(x)
        errors.append(layer.fill.numpy()[0] - x[:, 0].mean())
        assert layer.dp_epsilon_spent == pytest.approx(eps)
    errors = np.asarray(errors)
    scale = 5.0 / (eps / 4.0) / n
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale)).pvalue > 1e-3
    # The test has power: half or double the noise is rejected.
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale / 2)).pvalue < 1e-3
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale * 2)).pvalue < 1e-3


def test_dp_median_follows_the_exponential_mechanism():
    data = np.array([1.0, 2.0, 6.0, 6.5, 9.0])
    eps = 1.0
    samples = []
    for seed in range(400):
        layer = Imputer(strategy="median", dp_epsilon=eps, dp_bounds=(0.0, 10.0), seed=seed)
        layer.adapt(data[:, None])
        samples.append(float(layer.fill.numpy()[0]))
    cdf = exp_mechanism_cdf(data, 0.5, 0.0, 10.0, eps)
    assert scipy.stats.kstest(samples, cdf).pvalue > 1e-3
    # A mechanism with 4x the epsilon concentrates much more on the median: rejected.
    assert scipy.stats.kstest(samples, exp_mechanism_cdf(data, 0.5, 0.0, 10.0, 4.0)).pvalue < 1e-3


def test_dp_adapt_keeps_no_exact_counts():
    x = np.random.default_rng(1).uniform(size=(1234, 2))
    imputer = Imputer(dp_epsilon=1.0, dp_bounds=(0.0, 1.0), seed=0)
    imputer.adapt(x)
    assert imputer.missing_counts is None
    assert imputer.is_adapted and float(imputer.adapt_count.numpy()) != 1234.0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`strategy` must be one of 'mean', 'median'"):
        Imputer(strategy="mode")
    for bad in ("zero", np.inf, None):
        with pytest.raises(ValueError, match="`fill_value` must be"):
            Imputer(strategy="constant", fill_value=bad)
