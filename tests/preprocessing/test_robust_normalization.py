"""RobustNormalization: median/IQR and mean/std against numpy, outliers, inversion, DP."""

import keras
import numpy as np
import pytest
import scipy.stats

from keras_safe.preprocessing import RobustNormalization
from tests.preprocessing.references import lognormal_data


def test_robust_normalization_matches_numpy_and_resists_outliers():
    x = lognormal_data()
    x_out = x.copy()
    x_out[:4] = 1e6  # 1% extreme values
    layer = RobustNormalization()
    layer.adapt(x_out)
    med = np.median(x_out, axis=0)
    iqr = scipy.stats.iqr(x_out, axis=0)
    np.testing.assert_allclose(layer.center.numpy(), med, rtol=1e-6)
    np.testing.assert_allclose(layer.scale.numpy(), iqr, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(x)), (x - med) / iqr, rtol=1e-5, atol=1e-6)
    # Keras's Normalization on the same data: scale blown up by the outliers.
    plain = keras.layers.Normalization()
    plain.adapt(x_out)
    assert np.std(np.asarray(plain(x))[:, 0]) < 0.01
    assert 0.3 < np.std(np.asarray(layer(x))[:, 0]) < 3.0

    unit = RobustNormalization(unit_variance=True)
    normal = np.random.default_rng(0).normal(3.0, 2.0, size=(20000, 1))
    unit.adapt(normal)
    assert np.std(np.asarray(unit(normal))) == pytest.approx(1.0, abs=0.03)


def test_robust_normalization_mean_std_invert_and_constant_feature():
    x = lognormal_data()
    x[:, 2] = 5.0
    layer = RobustNormalization(method="mean_std")
    layer.adapt(x)
    np.testing.assert_allclose(layer.center.numpy(), x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.scale.numpy()[:2], x[:, :2].std(axis=0), rtol=1e-6)
    assert layer.scale.numpy()[2] == 1.0  # constant feature: scale 1
    inverse = RobustNormalization(method="mean_std", invert=True)
    inverse.adapt(x)
    np.testing.assert_allclose(np.asarray(inverse(layer(x))), x, rtol=1e-5)


def test_quantile_range_sets_the_scale():
    x = lognormal_data(n=1000, f=2)
    layer = RobustNormalization(quantile_range=(0.1, 0.9))
    layer.adapt(x)
    q10, q90 = np.percentile(x, [10, 90], axis=0)
    np.testing.assert_allclose(layer.scale.numpy(), q90 - q10, rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`method` must be one of 'median_iqr', 'mean_std'"):
        RobustNormalization(method="minmax")
    with pytest.raises(ValueError, match="`quantile_range` must be a pair"):
        RobustNormalization(quantile_range=(0.75, 0.25))
