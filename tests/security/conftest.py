"""Shared data and models of the security tests: scikit-learn's bundled digits, small MLPs."""

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

from keras_safe.layers import PredictionRounding


def digits():
    """Digits scaled to [0, 1], shuffled with a fixed seed: (x float32, y int64)."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order] / 16.0).astype("float32"), y[order].astype("int64")


def make_mlp(hidden=64, softmax=False):
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10, activation="softmax" if softmax else None),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax),
    )
    return model


def predict_labels(model, x):
    return np.argmax(np.asarray(model.predict(x, batch_size=512, verbose=0)), axis=-1)


def accuracy(model, x, y):
    return float(np.mean(predict_labels(model, x) == y))


@pytest.fixture(scope="session")
def digits_split():
    x, y = digits()
    return (x[:1200], y[:1200]), (x[1200:1500], y[1200:1500])


@pytest.fixture(scope="session")
def trained_mlp(digits_split):
    """A digits MLP (logits output) trained normally: about 95% test accuracy."""
    (x, y), _ = digits_split
    keras.utils.set_random_seed(0)
    model = make_mlp()
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="session")
def masked_models(trained_mlp):
    """The trained MLP behind a saturated softmax and behind quantised probabilities.

    Both predict exactly what the MLP predicts, but their gradients are zero (saturated: the
    logits are scaled by 1000 before the softmax) or absent (quantised: the probabilities
    rounded to one decimal by the `PredictionRounding` output defence).
    """
    body = list(trained_mlp.layers)
    saturated = keras.Sequential(
        [keras.Input((64,)), *body, keras.layers.Rescaling(1000.0), keras.layers.Softmax()]
    )
    quantised = keras.Sequential(
        [keras.Input((64,)), *body, keras.layers.Softmax(), PredictionRounding(decimals=1)]
    )
    return {"saturated": saturated, "quantised": quantised}
