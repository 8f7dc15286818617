"""Shared data and models of the audit tests: scikit-learn's bundled digits, tiny MLPs."""

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits


def digits():
    """Digits scaled to [0, 1], shuffled with a fixed seed: (x float32, y int)."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x[order] / 16.0).astype("float32"), y[order].astype("int64")


def make_mlp(hidden=128, learning_rate=1e-2, logits=True):
    """A small classifier of digits, compiled with Adam and sparse crossentropy."""
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10, activation=None if logits else "softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
    )
    return model


#: How the overfitted model (and LiRA's shadow models) are trained.
OVERFIT_FIT = {"epochs": 10, "batch_size": 16}


@pytest.fixture(scope="session")
def digits_data():
    return digits()


@pytest.fixture(scope="session")
def overfit(digits_data):
    """An MLP fitted to 150 digits until it memorises them; 150 held-out digits."""
    x, y = digits_data
    keras.utils.set_random_seed(7)
    model = make_mlp()
    model.fit(x[:150], y[:150], verbose=0, **OVERFIT_FIT)
    return model, (x[:150], y[:150]), (x[150:300], y[150:300])
