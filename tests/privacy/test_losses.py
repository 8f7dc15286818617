"""Per-example losses against Keras's own loss on one example at a time, and the probe that
refuses losses that are not per example."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.privacy.losses import PerExampleLoss, check_per_example

RNG = np.random.default_rng(3)


def _one_at_a_time(model, x, y, sample_weight=None):
    """Keras's compiled loss of a batch holding each example alone."""
    values = []
    for i in range(len(x)):
        sw = None if sample_weight is None else sample_weight[i : i + 1]
        pred = model(x[i : i + 1])
        values.append(float(model.compute_loss(x=x[i : i + 1], y=y[i : i + 1], y_pred=pred,
                                               sample_weight=sw)))  # fmt: skip
    return np.array(values)


@pytest.mark.parametrize(
    "loss, units, labels",
    [
        ("binary_crossentropy", 1, "flat"),  # labels [B] for outputs [B, 1]
        ("binary_crossentropy", 1, "column"),
        ("sparse_categorical_crossentropy", 4, "flat"),
        (keras.losses.Huber(delta=0.3), 3, "regression"),
        ("mse", 1, "flat"),
    ],
)
def test_matches_keras_one_example_at_a_time(loss, units, labels):
    x = RNG.normal(size=(6, 5)).astype("float32")
    activation = "sigmoid" if loss == "binary_crossentropy" else "softmax" if units == 4 else None
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(units, activation=activation)])
    model.compile(optimizer="sgd", loss=loss)
    if labels == "regression":
        y = RNG.normal(size=(6, units)).astype("float32")
    elif units == 4:
        y = RNG.integers(0, 4, 6)
    else:
        y = RNG.integers(0, 2, 6).astype("float32")
        y = y[:, None] if labels == "column" else y
    weights = RNG.uniform(0.5, 2.0, 6).astype("float32")
    got = PerExampleLoss(model)(tf.constant(y), model(x), tf.constant(weights)).numpy()
    np.testing.assert_allclose(got, _one_at_a_time(model, x, y, weights), rtol=1e-5, atol=1e-6)


def test_probe_refuses_batch_reductions_and_mixing():
    t = tf.zeros((4, 3))

    def mean_over_batch(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred), axis=0)

    def centred(y_true, y_pred):  # one value per example, but each depends on the batch mean
        centre = y_pred - tf.reduce_mean(y_pred, axis=0, keepdims=True)
        return tf.reduce_sum(tf.square(y_true - centre), axis=-1)

    for fn in (mean_over_batch, centred, lambda a, b: tf.reduce_mean(a - b)):
        with pytest.raises(PrivacyError, match="cannot be split per example"):
            check_per_example(fn, t, t)
    check_per_example(keras.losses.get("categorical_crossentropy"), t, t)
