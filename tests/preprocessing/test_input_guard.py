"""InputGuard: adapted ranges, the three violation modes, compiled models and tf.data, DP."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe.preprocessing import InputGuard
from tests.preprocessing.references import lognormal_data


def test_input_guard_modes():
    x = lognormal_data()
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
    x = lognormal_data()
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


def test_fixed_bounds_are_replaced_by_adapt_and_then_count_as_data():
    """`bounds` is data-free; once `adapt` replaces it, the layer holds statistics of the data."""
    x = lognormal_data()
    guard = InputGuard(bounds=(0.0, 1.0), tolerance=0.0)
    np.testing.assert_array_equal(guard.check(np.array([[0.5, 0.5, 2.0]]))["violation"], [True])
    assert not guard.is_adapted
    guard.adapt(x)
    np.testing.assert_allclose(guard.upper.numpy(), x.max(axis=0), rtol=1e-6)
    assert guard.is_adapted and guard.uses_data


def test_dp_range_is_close_to_exact_with_enough_data():
    x = np.random.default_rng(0).normal(size=(20000, 2))
    guard = InputGuard(quantile_range=(0.01, 0.99), dp_epsilon=2.0, dp_bounds=(-10, 10), seed=0)
    guard.adapt(x)
    q1, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    np.testing.assert_allclose(guard.upper.numpy(), q99 + (q99 - q1), atol=0.2)
    assert guard.dp_epsilon_spent == pytest.approx(2.0)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="`on_violation` must be one of 'raise', 'clip', 'flag'"):
        InputGuard(on_violation="ignore")
    with pytest.raises(ValueError, match="`tolerance` must be"):
        InputGuard(tolerance=-1)
    with pytest.raises(ValueError, match="`bounds` must be a pair"):
        InputGuard(bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="`bounds` must be scalars or one"):
        InputGuard(bounds=([0, 0], [1, 1])).build((None, 3))
