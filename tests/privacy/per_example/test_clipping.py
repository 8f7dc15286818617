"""The clipped gradient sum across rules: losses, weights, microbatches, unusual models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.privacy.per_example.clipping import clipped_gradient_sum
from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
    reference_update,
)
from tests.privacy.per_example.test_conv import FIT_CASES


def test_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(5, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    assert_fit_matches_reference(Net(), RNG.normal(size=(B, 4)), labels())


def test_sample_weight_and_weighted_multi_output_losses():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    cls = keras.layers.Dense(3, name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model(inputs, {"cls": cls, "reg": reg})
    y = {"cls": labels(), "reg": RNG.normal(size=(B, 1))}
    assert_fit_matches_reference(
        model,
        RNG.normal(size=(B, 4)),
        y,
        loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.5},
        sample_weight=RNG.uniform(0.2, 2.0, B),
    )


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean"])
def test_loss_objects_with_any_reduction(reduction):
    model = classifier([keras.layers.Dense(4)], (5,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5)), labels(), loss=loss)


def test_loss_function_returning_per_example_values():
    def my_loss(y_true, y_pred):
        return tf.reduce_mean(tf.abs(y_true - y_pred), axis=-1)

    model = classifier([keras.layers.Dense(4)], (5,))
    y = RNG.normal(size=(B, 3))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5)), y, loss=my_loss)


def test_microbatches_clip_each_microbatch_mean():
    model = classifier([keras.layers.Dense(5, activation="tanh")], (6,))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 6)), labels(), microbatches=4)


def test_microbatches_of_recurrent_and_sequence_forms():
    model = classifier([keras.layers.SimpleRNN(3)], (4, 2))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 4, 2)), labels(), microbatches=2)


def test_indivisible_microbatches_name_the_argument():
    model = classifier([keras.layers.Dense(2)], (3,))
    x = tf.constant(RNG.normal(size=(5, 3)), "float32")

    def forward():
        pred = model(x)
        return tf.reduce_sum(pred**2, axis=1), pred

    with pytest.raises(ValueError, match="`num_microbatches` must be a divisor of the batch"):
        clipped_gradient_sum(model, model.trainable_variables, forward, 1.0, num_microbatches=2)


def test_jacobian_path_agrees_with_rules():
    model = FIT_CASES["conv2d"]()[0]
    x = RNG.normal(size=(B, 10, 10, 2)).astype("float32")
    y = labels()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss_fn = keras_safe.privacy.losses.PerExampleLoss(model)

    def forward():
        pred = model(x, training=True)
        return loss_fn(y, pred), pred

    variables = model.trainable_variables
    tapped, _, _, tapped_norms = clipped_gradient_sum(model, variables, forward, 0.5)
    full, _, _, full_norms = clipped_gradient_sum(model, variables, forward, 0.5, use_rules=False)
    np.testing.assert_allclose(tapped_norms, full_norms, rtol=1e-4)
    for a, b in zip(tapped, full):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_scalar_loss_function_is_refused():
    model = classifier([keras.layers.Dense(4)], (5,))
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0),
        loss=lambda y_true, y_pred: tf.reduce_mean(tf.square(y_true - y_pred)),
    )
    keras_safe.privacy.make_private(model)
    with pytest.raises(PrivacyError, match="per example"):
        model.fit(RNG.normal(size=(B, 5)), RNG.normal(size=(B, 3)), verbose=0)


def test_batch_folded_into_rows_is_still_clipped_per_example():
    # Each example's 8 rows go through one Dense as 8 batch rows: the rules must not clip
    # each row on its own (that would let one example move the weights by 8 C).
    inputs = keras.Input((8, 5))
    rows = keras.ops.reshape(inputs, (-1, 5))
    out = keras.ops.reshape(keras.layers.Dense(3)(rows), (-1, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.ops.mean(out, axis=1)))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 8, 5)), labels())


def test_a_non_finite_example_is_dropped_not_spread_over_the_step():
    x = RNG.normal(size=(B, 6))
    y = labels()
    model = classifier([keras.layers.Dense(5, activation="tanh")], (6,))
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(1.0, l2_norm_clip=0.5, noise_multiplier=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras_safe.privacy.make_private(model)
    before = [np.array(v) for v in model.trainable_variables]
    # The reference: the other examples' clipped gradients, divided by the full batch size.
    expected = reference_update(model, x[1:], y[1:], 0.5)
    bad = x.copy()
    bad[0, 0] = np.nan
    model.fit(bad, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    for b, a, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(b - np.array(a), e * (B - 1) / B, atol=1e-5)


def test_a_trainable_variable_the_loss_does_not_use():
    class Unused(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(2,), initializer="ones")

        def call(self, x):
            return x

    model = classifier([keras.layers.Dense(4), Unused()], (5,))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5)), labels())


def test_a_batch_folded_where_no_trace_knew_the_batch_size_is_refused_naming_the_layer():
    # Traced only for any number of rows, the rules cannot see that the middle layer's rows
    # are not the examples: the step's one runtime check of the leading axes refuses it.
    inputs = keras.Input((8, 5))
    rows = keras.ops.reshape(inputs, (-1, 5))
    folded = keras.layers.Dense(3, name="on_folded_rows")
    out = keras.ops.reshape(folded(rows), (-1, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.ops.mean(out, axis=1)))
    variables = model.trainable_variables

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 5]), tf.TensorSpec([None], tf.int64)])
    def step(x, y):
        def forward():
            pred = model(x, training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y, pred, from_logits=True)
            return loss, pred

        return clipped_gradient_sum(model, variables, forward, 1.0)[0]

    with pytest.raises(tf.errors.InvalidArgumentError, match="on_folded_rows.*not the example"):
        step(RNG.normal(size=(B, 8, 5)).astype("float32"), labels().astype("int64"))


def test_folded_batch_with_a_smaller_last_batch():
    # The last batch of an epoch is smaller, so Keras traces again without a known batch size;
    # the layer on folded rows must still go to the fallback instead of failing the step.
    inputs = keras.Input((8, 5))
    rows = keras.ops.reshape(inputs, (-1, 5))
    out = keras.ops.reshape(keras.layers.Dense(3)(rows), (-1, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.ops.mean(out, axis=1)))
    check = check_with_oracle(model, RNG.normal(size=(6, 8, 5)), labels(count=6))
    assert check.fallback == "vectorized" and check.max_sensitivity <= 1 + 1e-5
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras_safe.privacy.make_private(model)
    history = model.fit(RNG.normal(size=(10, 8, 5)), labels(count=10), batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
