"""The DP mechanisms of the preprocessing layers: noise scales, ranges, argument checks."""

import numpy as np
import pytest
import scipy.stats

from keras_safe.preprocessing import _dp_stats


def test_dp_mean_std_noise_matches_the_laplace_scales():
    """Centred data: the noisy centred sum has Laplace noise of scale half / (eps / 3)."""
    values = np.concatenate([np.full(5000, 2.0), np.full(5000, 8.0)])  # mean 5, std 3
    eps, lo, hi = 0.9, 0.0, 10.0
    means, stds = [], []
    for seed in range(300):
        mean, std = _dp_stats.dp_mean_std(values, lo, hi, eps, np.random.default_rng(seed))
        means.append(mean)
        stds.append(std)
    # mean = mid + (sum + L) / (n + L'): to first order the error is L / n, L ~ Laplace(5 / 0.3).
    scale = 5.0 / (eps / 3.0) / values.size
    errors = np.asarray(means) - 5.0
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale)).pvalue > 1e-3
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, 2 * scale)).pvalue < 1e-3
    assert np.median(np.abs(np.asarray(stds) - 3.0)) < 0.05


def test_outputs_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    values = rng.normal(size=3)
    for _ in range(200):
        assert 0.0 <= _dp_stats.dp_mean(values, 0.0, 1.0, 0.01, rng) <= 1.0
        mean, std = _dp_stats.dp_mean_std(values, -1.0, 1.0, 0.01, rng)
        assert -1.0 <= mean <= 1.0 and 0.0 <= std <= 1.0
        assert -2.0 <= _dp_stats.dp_quantile(values, 0.9, -2.0, 2.0, 0.01, rng) <= 2.0
    assert _dp_stats.dp_quantile(np.array([]), 0.5, 3.0, 4.0, 1.0, rng) >= 3.0


def test_bounds_and_epsilon_checks():
    assert _dp_stats.normalize_bounds((0, 1)) == (0.0, 1.0)
    assert _dp_stats.normalize_bounds(([0, 1], 5)) == ([0.0, 1.0], 5.0)
    assert _dp_stats.normalize_bounds(None) is None
    for bad in [(1, 0), (0, np.inf), ([[0]], [[1]]), ([0, 1], [1, 2, 3]), (0,), "ab", 3]:
        with pytest.raises(ValueError, match="`dp_bounds` must be a pair"):
            _dp_stats.normalize_bounds(bad)
    lo, hi = _dp_stats.bounds_per_feature((0.0, [1.0, 2.0]), 2)
    np.testing.assert_array_equal(lo, [0.0, 0.0])
    np.testing.assert_array_equal(hi, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"one \(lo, hi\) per feature \(3 features\)"):
        _dp_stats.bounds_per_feature((0.0, [1.0, 2.0]), 3)
    assert _dp_stats.check_epsilon(2) == 2.0 and _dp_stats.check_epsilon(None) is None
    for bad in (0, -1.0, np.inf, True, "1"):
        with pytest.raises(ValueError, match="`dp_epsilon` must be"):
            _dp_stats.check_epsilon(bad)
