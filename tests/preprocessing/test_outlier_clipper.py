"""OutlierClipper: fences against numpy/scipy, robustness to extreme values, NaN/inf, DP fences."""

import numpy as np
import pytest
import scipy.stats

from keras_safe.preprocessing import OutlierClipper
from tests.preprocessing.references import lognormal_data


def test_clipper_fences_match_numpy_scipy():
    x = lognormal_data()
    for method, expected in [
        (
            "iqr",
            lambda c: (
                np.percentile(c, 25) - 1.5 * scipy.stats.iqr(c),
                np.percentile(c, 75) + 1.5 * scipy.stats.iqr(c),
            ),
        ),
        ("quantile", lambda c: (np.percentile(c, 1), np.percentile(c, 99))),
        ("zscore", lambda c: (c.mean() - 3 * c.std(), c.mean() + 3 * c.std())),
        (
            "mad",
            lambda c: (
                np.median(c) - 3 * scipy.stats.median_abs_deviation(c, scale="normal"),
                np.median(c) + 3 * scipy.stats.median_abs_deviation(c, scale="normal"),
            ),
        ),
    ]:
        clipper = OutlierClipper(method=method)
        clipper.adapt(x)
        lo = np.array([expected(x[:, j])[0] for j in range(3)])
        hi = np.array([expected(x[:, j])[1] for j in range(3)])
        np.testing.assert_allclose(clipper.lower.numpy(), lo, rtol=1e-5, err_msg=method)
        np.testing.assert_allclose(clipper.upper.numpy(), hi, rtol=1e-5, err_msg=method)
        out = np.asarray(clipper(x))
        np.testing.assert_allclose(out, np.clip(x, lo, hi), rtol=1e-5)
        # Reported count: a brute-force count of values outside the fences.
        brute = sum(int(v < lo[j] or v > hi[j]) for row in x for j, v in enumerate(row))
        assert clipper.clipped_count == brute, method


def test_clipper_robust_default_with_one_percent_extreme_outliers():
    rng = np.random.default_rng(0)
    n = 2000
    clean = rng.normal(size=(n, 1))
    x = clean.copy()
    idx = rng.choice(n, size=n // 100, replace=False)
    x[idx] = 1e6
    clipper = OutlierClipper()  # default: robust IQR fences
    clipper.adapt(x)
    upper = float(clipper.upper.numpy()[0])
    # Fences from the clean data alone are about +-2.7 sigma; 1% of outliers moves them little.
    clean_q1, clean_q3 = np.percentile(clean, [25, 75])
    assert upper < clean_q3 + 1.5 * (clean_q3 - clean_q1) + 0.3
    assert clipper.clipped_per_feature[0] >= n // 100
    assert np.asarray(clipper(np.array([[1e6]])))[0, 0] == pytest.approx(upper)
    # The z-score fence on the same column is dragged by the outliers: mean + 3 std of the
    # contaminated column (about 1e4 + 3 * 1e5) leaves the clipped outliers extreme.
    z = OutlierClipper(method="zscore")
    z.adapt(x)
    expected = x.mean() + 3 * x.std()
    assert float(z.upper.numpy()[0]) == pytest.approx(expected, rel=1e-5)
    assert expected > 1e5


def test_clipper_keeps_nan_and_clips_inf():
    clipper = OutlierClipper(method="quantile", quantile_range=(0.0, 1.0))
    clipper.adapt(np.array([[0.0], [1.0], [2.0]]))
    out = np.asarray(clipper(np.array([[np.nan], [np.inf], [-np.inf], [1.5]]))).ravel()
    assert np.isnan(out[0])
    np.testing.assert_array_equal(out[1:], [2.0, 0.0, 1.5])


def test_dp_fences_are_close_to_exact_with_enough_data():
    x = np.random.default_rng(0).normal(size=(20000, 2))
    for method in ["iqr", "quantile", "zscore", "mad"]:
        exact = OutlierClipper(method=method)
        exact.adapt(x)
        private = OutlierClipper(method=method, dp_epsilon=2.0, dp_bounds=(-10, 10), seed=1)
        private.adapt(x)
        np.testing.assert_allclose(private.upper.numpy(), exact.upper.numpy(), atol=0.1)
        np.testing.assert_allclose(private.lower.numpy(), exact.lower.numpy(), atol=0.1)
        assert private.dp_epsilon_spent == pytest.approx(2.0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`method` must be one of 'iqr'"):
        OutlierClipper(method="sigma")
    with pytest.raises(ValueError, match="`quantile_range` must be a pair"):
        OutlierClipper(method="quantile", quantile_range=(0.9, 0.1))
    with pytest.raises(ValueError, match="`iqr_factor` must be"):
        OutlierClipper(iqr_factor=-1.0)
    with pytest.raises(ValueError, match="`z` must be"):
        OutlierClipper(z=0.0)
