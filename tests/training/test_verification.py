"""A private model is verified on its first examples before it trains, through the public API."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private
from keras_safe.testing import assert_dp_matches_reference

RNG = np.random.default_rng(9)


class CentreOnBatch(keras.layers.Layer):
    """Subtracts the batch mean: no weights, yet every example's output depends on the others."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


class Scale(keras.layers.Layer):
    """A custom layer with a weight and no per-example rule: it uses the Jacobian fallback."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def _compiled(layers, noise=0.0):
    model = keras.Sequential([keras.Input((5,)), *layers, keras.layers.Dense(3)])
    model.compile(
        optimizer=DPSGD(1.0, l2_norm_clip=0.5, noise_multiplier=noise),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_a_layer_that_mixes_examples_is_refused_before_any_step():
    x, y = RNG.normal(size=(32, 5)).astype("float32"), RNG.integers(0, 3, 32)
    model = make_private(_compiled([CentreOnBatch()]))
    before = [np.array(v) for v in model.trainable_variables]
    with pytest.raises(PrivacyError, match="Examples interact"):
        model.fit(x, y, batch_size=8, verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))
    assert get_ledger(model).steps == 0


def test_a_custom_layer_is_verified_and_then_matches_the_oracle():
    x, y = RNG.normal(size=(16, 5)).astype("float32"), RNG.integers(0, 3, 16)
    model = make_private(_compiled([Scale(), keras.layers.Dense(4, activation="tanh")]))
    model.fit(x, y, batch_size=8, verbose=0)
    assert keras_safe.training.state.fallback_mode(model) in ("vectorized", "loop")
    check = assert_dp_matches_reference(model, x[:8], y[:8])
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5


def test_a_compiled_custom_loop_needs_a_verified_model():
    x, y = RNG.normal(size=(16, 5)).astype("float32"), RNG.integers(0, 3, 16)
    optimizer = DPSGD(0.1, l2_norm_clip=0.5, noise_multiplier=1.0, num_examples=16, batch_size=8)
    model = keras.Sequential([keras.Input((5,)), Scale(), keras.layers.Dense(3)])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    make_private(model)
    model.optimizer.build(model.trainable_variables)  # variables outside the compiled step

    @tf.function
    def step(xb, yb):
        grads = keras_safe.privacy.dp_gradients(model, xb, yb)
        model.optimizer.apply(grads, model.trainable_variables)

    with pytest.raises(PrivacyError, match="verify_model"):
        step(x[:8], y[:8])
    keras_safe.training.verify_model(model, x[:4], y[:4])
    step(x[:8], y[:8])
    assert get_ledger(model).steps == 1
