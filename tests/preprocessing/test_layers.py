"""Imputer, OutlierClipper, RobustNormalization and InputGuard against numpy/scipy references."""

import keras
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import tensorflow as tf

from keras_safe.preprocessing import Imputer, InputGuard, OutlierClipper, RobustNormalization
from tests.testing import assert_config_round_trip


def _data(n=400, f=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.lognormal(mean=1.0, sigma=0.7, size=(n, f)) * np.array([1.0, 10.0, 0.1])[:f]


# -- Imputer -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_imputer_matches_nan_statistics(strategy):
    x = _data()
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
    assert_config_round_trip(imputer)


# -- OutlierClipper ------------------------------------------------------------------------
def test_clipper_fences_match_numpy_scipy():
    x = _data()
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


# -- RobustNormalization -------------------------------------------------------------------
def test_robust_normalization_matches_numpy_and_resists_outliers():
    x = _data()
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
    x = _data()
    x[:, 2] = 5.0
    layer = RobustNormalization(method="mean_std")
    layer.adapt(x)
    np.testing.assert_allclose(layer.center.numpy(), x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(layer.scale.numpy()[:2], x[:, :2].std(axis=0), rtol=1e-6)
    assert layer.scale.numpy()[2] == 1.0  # constant feature: scale 1
    inverse = RobustNormalization(method="mean_std", invert=True)
    inverse.adapt(x)
    np.testing.assert_allclose(np.asarray(inverse(layer(x))), x, rtol=1e-5)


# -- InputGuard ----------------------------------------------------------------------------
def test_input_guard_modes():
    x = _data()
    lo, hi = x.min(axis=0), x.max(axis=0)
    bad = np.array([x[0], x[1], x[2]], dtype="float64")
    bad[1, 0] = hi[0] + 2.0 * (hi[0] - lo[0])  # beyond tolerance 1.0
    bad[2, 2] = np.nan
    ok = x[:5]

    guard = InputGuard()
    guard.adapt(x)
    np.testing.assert_allclose(guard.lower.numpy(), lo - (hi - lo), rtol=1e-5)
    np.testing.assert_allclose(guard.upper.numpy(), hi + (hi - lo), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(guard(ok)), ok, rtol=1e-6)
    with pytest.raises(ValueError, match="rejected"):
        guard(bad)
    with pytest.raises(ValueError, match="built for 3 features"):
        guard(np.zeros((2, 4)))
    report = guard.check(bad)
    np.testing.assert_array_equal(report["violation"], [False, True, True])
    assert report["out_of_range"][1, 0] and report["non_finite"][2, 2]

    clip = InputGuard(on_violation="clip")
    clip.adapt(x)
    out = np.asarray(clip(bad))
    assert out[1, 0] == pytest.approx(hi[0] + (hi[0] - lo[0]), rel=1e-5)
    assert out[2, 2] == pytest.approx(np.median(x[:, 2]), rel=1e-5)

    flag = InputGuard(on_violation="flag")
    flag.adapt(x)
    out = np.asarray(flag(bad))
    assert out.shape == (3, 4)
    np.testing.assert_array_equal(out[:, -1], [0.0, 1.0, 1.0])
    assert flag.compute_output_shape((None, 3)) == (None, 4)

    lenient = InputGuard(on_violation="clip", check_finite=False, bounds=(0.0, 10.0))
    out = np.asarray(lenient(np.array([[np.nan, 20.0, -1.0]])))
    assert np.isnan(out[0, 0]) and out[0, 1] == 10.0 and out[0, 2] == 0.0


def test_input_guard_raises_inside_compiled_model_and_tf_data():
    x = _data()
    guard = InputGuard()
    guard.adapt(x)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(guard(inputs)))
    assert model.predict(x[:8], verbose=0).shape == (8, 1)
    bad = x[:2].astype("float32").copy()
    bad[0, 1] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="InputGuard"):
        model.predict(bad, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices(bad).batch(2).map(guard)
    with pytest.raises(tf.errors.InvalidArgumentError, match="InputGuard"):
        list(ds)


# -- shared behaviour ----------------------------------------------------------------------
LAYERS = [
    lambda: Imputer(strategy="mean"),
    lambda: OutlierClipper(method="mad"),
    lambda: RobustNormalization(),
    lambda: InputGuard(on_violation="clip"),
]


@pytest.mark.parametrize("factory", LAYERS)
def test_eager_model_and_tf_data_agree(factory):
    x = _data(n=64).astype("float32")
    x[3, 1] = np.nan if not isinstance(factory(), RobustNormalization) else x[3, 1]
    layer = factory()
    layer.adapt(tf.data.Dataset.from_tensor_slices(x).batch(16))  # adapt from a dataset
    reference = factory()
    reference.adapt(x)  # same statistics from the array
    for a, b in zip(layer.weights, reference.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    eager = np.asarray(layer(x))
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs))
    np.testing.assert_allclose(model.predict(x, batch_size=16, verbose=0), eager, rtol=1e-6)
    mapped = np.concatenate(list(tf.data.Dataset.from_tensor_slices(x).batch(16).map(layer)))
    np.testing.assert_allclose(mapped, eager, rtol=1e-6)
    assert_config_round_trip(layer)


def test_adapt_accepts_dataframe_tensor_unbatched_dataset_and_xy_dataset():
    x = _data(n=50)
    expected = np.median(x, axis=0)
    sources = [
        pd.DataFrame(x, columns=["a", "b", "c"]),
        tf.constant(x),
        tf.data.Dataset.from_tensor_slices(x),
        tf.data.Dataset.from_tensor_slices((x, np.zeros(50))).batch(7),
    ]
    for data in sources:
        layer = Imputer()
        layer.adapt(data)
        np.testing.assert_allclose(layer.fill.numpy(), expected, rtol=1e-6)
        assert layer.is_adapted


@pytest.mark.parametrize("cls", [Imputer, OutlierClipper, RobustNormalization, InputGuard])
def test_bad_input_errors_name_the_problem(cls):
    with pytest.raises(ValueError, match="empty"):
        cls().adapt(np.zeros((0, 3)))
    x = _data(n=20)
    x[:, 1] = np.nan
    frame = pd.DataFrame(x, columns=["age", "income", "height"])
    with pytest.raises(ValueError, match=r"feature 1 \('income'\) has no finite value"):
        cls().adapt(frame)
    layer = cls()
    layer.adapt(_data(n=20))
    with pytest.raises(ValueError, match="built for 3 features but the data has 2"):
        layer.adapt(_data(n=20, f=2))
    with pytest.raises(ValueError, match="x.reshape"):
        cls().adapt(np.arange(5.0))
    with pytest.raises(ValueError, match="dp_bounds"):
        cls(dp_epsilon=1.0).adapt(_data(n=20))
    with pytest.raises(ValueError, match="dp_epsilon"):
        cls(dp_epsilon=-1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        cls(dp_epsilon=1.0, dp_bounds=(1.0, 0.0))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="strategy"):
        Imputer(strategy="mode")
    with pytest.raises(ValueError, match="method"):
        OutlierClipper(method="sigma")
    with pytest.raises(ValueError, match="quantile_range"):
        OutlierClipper(method="quantile", quantile_range=(0.9, 0.1))
    with pytest.raises(ValueError, match="method"):
        RobustNormalization(method="minmax")
    with pytest.raises(ValueError, match="on_violation"):
        InputGuard(on_violation="ignore")
    with pytest.raises(ValueError, match="tolerance"):
        InputGuard(tolerance=-1)
