"""The Jacobian fallback and `verify`: the fallback is checked before it is trusted."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example import clipping, fallback, reference
from keras_safe.privacy.per_example.verification import verify

RNG = np.random.default_rng(11)


class Bilinear(keras.layers.Layer):
    """No rule: `y = (x * w) @ v`."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal", name="w")
        self.v = self.add_weight(shape=(input_shape[-1], 2), initializer="random_normal", name="v")

    def call(self, x):
        return keras.ops.matmul(x * self.w, self.v)


class CentreOnBatch(keras.layers.Layer):
    """Mixes examples: subtracts the batch mean (as batch normalization does)."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


def _compiled(*layers, shape=(4,)):
    model = keras.Sequential([keras.Input(shape), *layers, keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(count=5, shape=(4,)):
    return RNG.normal(size=(count, *shape)), RNG.integers(0, 3, count)


def test_jacobian_falls_back_to_a_loop_when_pfor_cannot_vectorize():
    variable = tf.Variable([1.0, 2.0])
    x = tf.constant([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    calls = []

    class RefusingTape(tf.GradientTape):
        def jacobian(self, target, sources, experimental_use_pfor=True, **kwargs):
            calls.append(experimental_use_pfor)
            if experimental_use_pfor:
                raise ValueError("pfor cannot convert this op")
            return super().jacobian(
                target, sources, experimental_use_pfor=experimental_use_pfor, **kwargs
            )

    with RefusingTape(persistent=True) as tape:
        losses = tf.reduce_sum(tf.square(x * variable), axis=1)
    (jac,) = fallback.jacobian(tape, losses, [variable])
    assert calls == [True, False]
    # d/dv sum((x v)^2) = 2 x^2 v, one row per example.
    np.testing.assert_allclose(jac, 2 * x.numpy() ** 2 * variable.numpy(), rtol=1e-6)


@pytest.mark.parametrize("mode", ["vectorized", "loop"])
def test_an_empty_batch_of_unknown_size_gives_empty_rows(mode):
    # A Poisson batch can hold no example; the step's Jacobian must not fail on it.
    variable = tf.Variable([[1.0, 2.0], [0.5, -1.0]])

    @tf.function(input_signature=[tf.TensorSpec([None, 2])])
    def rows(x):
        with tf.GradientTape(persistent=True) as tape:
            losses = tf.reduce_sum(tf.square(tf.matmul(x, variable)), axis=1)
        return fallback.jacobian(tape, losses, [variable], fallback=mode)[0]

    assert rows(tf.zeros([0, 2])).shape == (0, 2, 2)
    x = tf.constant([[1.0, 0.0], [2.0, 3.0]])
    # d/dW sum((x W)^2) = 2 x^T (x W), one example at a time.
    expected = [2 * np.outer(r, r @ variable.numpy()) for r in x.numpy()]
    np.testing.assert_allclose(rows(x), expected, rtol=1e-6)


def test_unknown_fallback_names_the_argument():
    with pytest.raises(ArgumentError, match="`fallback` must be one of 'vectorized', 'loop'"):
        fallback.jacobian(None, None, [], fallback="pfor")


@pytest.mark.parametrize("mode", ["vectorized", "loop"])
def test_both_modes_match_the_oracle(mode):
    model = _compiled(Bilinear())
    x, y = _data()
    check = keras_safe.testing.assert_dp_matches_reference(model, x, y, fallback=mode)
    assert check.fallback == mode and check.max_sensitivity <= 1 + 1e-5


def test_verify_accepts_a_correct_fallback():
    model = _compiled(Bilinear())
    x, y = _data()
    found = verify(model, PerExampleLoss(model), x, y)
    assert found.fallback == "vectorized"
    assert set(found.fallback_variables) == {"sequential/bilinear/w", "sequential/bilinear/v"}
    assert found.max_error < 1e-3


def test_verify_skips_the_reference_when_every_weight_has_a_built_in_rule(monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference should not be needed")

    monkeypatch.setattr(reference, "gradients_alone", no_reference)
    model = _compiled(keras.layers.Dense(4))
    found = verify(model, PerExampleLoss(model), *_data())
    assert found.fallback is None and str(found) == "every variable has a built-in rule"


def test_verify_refuses_a_fallback_that_mixes_examples(monkeypatch):
    original = fallback.jacobian

    def mixing(tape, losses, variables, mode="vectorized"):
        # Each example's rows swapped with its neighbour's: right norms, wrong owners; and
        # the first row doubled, so norms are wrong too.
        rows = original(tape, losses, variables, mode)
        return [tf.concat([2 * j[1:2], j[:1], j[2:]], axis=0) for j in rows]

    monkeypatch.setattr(clipping, "jacobian", mixing)
    model = _compiled(Bilinear())
    with pytest.raises(PrivacyError, match="neither the vectorized nor the loop.*bilinear/w"):
        verify(model, PerExampleLoss(model), *_data())


def test_verify_refuses_examples_that_interact():
    model = _compiled(keras.layers.Dense(4), CentreOnBatch())
    with pytest.raises(PrivacyError, match="Examples interact"):
        verify(model, PerExampleLoss(model), *_data())


def test_verify_refuses_a_loss_averaged_over_the_batch():
    model = _compiled(keras.layers.Dense(4))

    def batch_mean(y, y_pred, sample_weight=None):  # one value per example, but the batch's
        per_example = keras.losses.sparse_categorical_crossentropy(y, y_pred, from_logits=True)
        return keras.ops.zeros_like(per_example) + keras.ops.mean(per_example)

    with pytest.raises(PrivacyError, match="Examples interact"):
        verify(model, batch_mean, *_data())


def test_verify_with_microbatches():
    model = _compiled(Bilinear())
    found = verify(model, PerExampleLoss(model), *_data(count=6), num_microbatches=3)
    assert found.fallback == "vectorized"


def test_verify_leaves_out_an_example_whose_gradient_is_not_finite():
    # Such an example is dropped by the train step; it must not make verification refuse.
    model = _compiled(Bilinear())
    x, y = _data()
    x[1, 0] = np.nan
    found = verify(model, PerExampleLoss(model), x, y)
    assert found.fallback == "vectorized" and found.max_error < 1e-3
    x[:, 0] = np.nan
    with pytest.raises(PrivacyError, match="None of the 5 examples given to verify has a finite"):
        verify(model, PerExampleLoss(model), x, y)
