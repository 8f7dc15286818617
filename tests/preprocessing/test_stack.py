"""PreprocessingStack: adapt order, models and tf.data, saving in a fresh process, epsilon."""

import os
import tempfile

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from keras_safe.preprocessing import (
    Imputer,
    InputGuard,
    OutlierClipper,
    PreprocessingStack,
    RobustNormalization,
    train_val_test_split,
)
from tests.layers.test_weight_noise import weight_noise_models
from tests.testing import (
    assert_config_round_trip,
    assert_fit_one_step,
    assert_saves_in_fresh_process,
)


def _dirty(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=[0.0, 50.0, -3.0], scale=[1.0, 10.0, 0.5], size=(n, 3))
    x[rng.random(x.shape) < 0.05] = np.nan
    x[rng.choice(n, 3, replace=False), 1] = 1e6
    y = (np.nan_to_num(x[:, 0]) > 0).astype("float32")
    return x, y


def _stack():
    return PreprocessingStack(
        [
            InputGuard(on_violation="clip", check_finite=False, tolerance=1.0),
            Imputer(strategy="median", add_indicator=True),
            OutlierClipper(),
            RobustNormalization(),
        ]
    )


def test_stack_adapts_in_order_on_training_part_only():
    x, y = _dirty()
    (x_train, _), (x_val, _), _ = train_val_test_split(x, y, val=0.2, test=0.2, seed=0)
    stack = _stack()
    stack.adapt(x_train)
    guard, imputer, clipper, norm = stack.layers
    # Independent numpy pipeline on the training rows only.
    med = np.nanmedian(x_train, axis=0)
    np.testing.assert_allclose(imputer.fill.numpy(), med, rtol=1e-6)
    imputed = np.where(np.isfinite(x_train), x_train, med)
    features = np.concatenate([imputed, (~np.isfinite(x_train)).astype(float)], axis=1)
    q1, q3 = np.percentile(features, [25, 75], axis=0)
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    np.testing.assert_allclose(clipper.lower.numpy(), lo, rtol=1e-5, atol=1e-6)
    clipped = np.clip(features, lo, hi)
    np.testing.assert_allclose(norm.center.numpy(), np.median(clipped, axis=0), rtol=1e-5)
    iqr = scipy.stats.iqr(clipped, axis=0)
    np.testing.assert_allclose(norm.scale.numpy(), np.where(iqr > 0, iqr, 1.0), rtol=1e-5)
    # Not adapted on the validation rows: the statistics differ from whole-data ones.
    assert not np.allclose(imputer.fill.numpy(), np.nanmedian(x, axis=0))
    out = np.asarray(stack(x_val))
    assert out.shape == (len(x_val), 6) and np.all(np.isfinite(out))
    assert stack.compute_output_shape((None, 3)) == (None, 6)
    assert_config_round_trip(stack)


def test_stack_with_keras_layers_and_tf_data():
    x, _ = _dirty(n=120)
    stack = PreprocessingStack([Imputer(), keras.layers.Normalization()])
    stack.adapt(tf.data.Dataset.from_tensor_slices(x).batch(32))
    filled = np.where(np.isfinite(x), x, np.nanmedian(x, axis=0))
    np.testing.assert_allclose(stack.layers[1].mean.numpy().ravel(), filled.mean(axis=0), rtol=1e-5)
    mapped = np.concatenate(list(tf.data.Dataset.from_tensor_slices(x).batch(32).map(stack)))
    np.testing.assert_allclose(mapped, np.asarray(stack(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`layers` must be a non-empty list"):
        PreprocessingStack([])
    with pytest.raises(ValueError, match=r"`layers\[1\]` must be a Keras layer, got a str"):
        PreprocessingStack([Imputer(), "scale"])
    with pytest.raises(ValueError, match="`data` must be non-empty"):
        _stack().adapt(np.zeros((0, 3)))


def test_models_train_save_and_load_in_a_fresh_process():
    x, y = _dirty()
    x32 = x.astype("float32")
    cases, targets = [], []

    def model_for(layer, adapt_on=x):
        layer.adapt(adapt_on)
        inputs = keras.Input((3,))
        outputs = keras.layers.Dense(1, activation="sigmoid")(layer(inputs))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer="adam", loss="binary_crossentropy")
        return model

    clean = np.nan_to_num(x32, nan=0.0)
    clean[:, 1] = np.clip(clean[:, 1], 0, 100)
    layers_and_inputs = [
        (_stack(), x32),
        (Imputer(strategy="mean", add_indicator=True), x32),
        (OutlierClipper(method="quantile", dp_epsilon=1.0, dp_bounds=(-100, 100), seed=0), clean),
        (RobustNormalization(method="mean_std"), clean),
        (InputGuard(on_violation="flag"), x32),
        (InputGuard(), clean),
    ]
    for layer, inputs in layers_and_inputs:
        model = model_for(layer, adapt_on=inputs if layer.__class__ is not Imputer else x)
        assert_fit_one_step(model, inputs, y, batch_size=64)
        assert np.all(np.isfinite(model.predict(inputs, verbose=0)))
        cases.append((model, inputs))
        targets.append(y)
    # WeightNoise's models (tests/layers/test_weight_noise.py) load in the same fresh process.
    noise_cases, noise_targets = weight_noise_models()
    assert_saves_in_fresh_process(cases + noise_cases, fit_after_load=targets + noise_targets)

    # Statistics and the epsilon spent travel with the model.
    path = os.path.join(tempfile.mkdtemp(), "dp.keras")
    cases[2][0].save(path)
    loaded = keras.saving.load_model(path)
    layer = next(lay for lay in loaded.layers if isinstance(lay, OutlierClipper))
    assert layer.dp_epsilon_spent == pytest.approx(1.0) and layer.is_adapted
    np.testing.assert_array_equal(layer.upper.numpy(), layers_and_inputs[2][0].upper.numpy())


def test_epsilon_accounting_per_layer_and_stack():
    x = np.random.default_rng(0).normal(size=(500, 3))
    stack = PreprocessingStack(
        [
            Imputer(strategy="constant"),
            OutlierClipper(dp_epsilon=0.5, dp_bounds=([-4, -4, -4], [4, 4, 4]), seed=0),
            RobustNormalization(dp_epsilon=1.0, dp_bounds=(-4.0, 4.0), seed=0),
        ]
    )
    stack.adapt(x)
    assert [layer.dp_epsilon_spent for layer in stack.layers] == pytest.approx([0.0, 0.5, 1.0])
    assert stack.dp_epsilon_spent == pytest.approx(1.5)


def test_stack_reports_layers_with_exact_statistics_as_infinite_epsilon():
    x = np.random.default_rng(1).uniform(size=(300, 2))
    exact = PreprocessingStack(
        [RobustNormalization(), RobustNormalization(dp_epsilon=1.0, dp_bounds=(-9, 9))]
    )
    exact.adapt(x)
    assert exact.dp_epsilon_spent == float("inf")
    # An InputGuard given fixed bounds is adapted by the stack like any layer: its range then
    # comes from the data, so the stack's statistics are no longer private.
    guarded = PreprocessingStack(
        [
            InputGuard(on_violation="clip", bounds=(0.0, 1.0)),
            RobustNormalization(dp_epsilon=1.0, dp_bounds=(-9, 9)),
        ]
    )
    assert guarded.dp_epsilon_spent == 0.0  # nothing adapted yet
    guarded.adapt(x)
    assert guarded.dp_epsilon_spent == float("inf")
    private = PreprocessingStack(
        [
            InputGuard(on_violation="clip", dp_epsilon=0.5, dp_bounds=(0.0, 1.0)),
            RobustNormalization(dp_epsilon=1.0, dp_bounds=(-9, 9)),
        ]
    )
    private.adapt(x)
    assert private.dp_epsilon_spent == pytest.approx(1.5)
