"""One ledger per set of trained weights: shared layers and copied weights, attacked and measured.

Each test trains the same weights through two private models and compares what the ledger then
reports with dp-accounting called directly on every step those weights took.
"""

import keras
import numpy as np
import pytest

from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private
from tests.dp_reference import epsilon as reference_epsilon

RNG = np.random.default_rng(6)
N, B, SIGMA = 200, 10, 1.1
X = RNG.normal(size=(N, 5)).astype("float32")
Y = (X[:, 0] > 0).astype("int32")


def _private(model):
    model.compile(
        optimizer=DPSGD(learning_rate=0.05, l2_norm_clip=1.0, noise_multiplier=SIGMA),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return make_private(model)


def _train(model, epochs=1):
    model.fit(X, Y, batch_size=B, epochs=epochs, verbose=0)
    return get_ledger(model)


def _truth(steps):
    return reference_epsilon(SIGMA, B / N, steps, 1e-5)


def test_two_models_sharing_a_layer_charge_one_ledger():
    shared = keras.layers.Dense(4, activation="relu")
    first = _private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)]))
    second = _private(keras.Sequential([keras.Input((5,)), shared, keras.layers.Dense(2)]))
    steps = _train(first).steps
    ledger = _train(second)
    assert ledger is get_ledger(first)
    assert ledger.steps == 2 * steps
    assert ledger.epsilon(1e-5) == pytest.approx(_truth(2 * steps), rel=1e-9)
    # Each model alone would have reported the epsilon of half the steps: the attack's gap.
    assert _truth(steps) < ledger.epsilon(1e-5) - 0.1


def test_weights_copied_into_a_clone_continue_the_original_ledger():
    original = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    steps = _train(original).steps
    clone = _private(keras.models.clone_model(original))
    clone.set_weights(original.get_weights())
    ledger = _train(clone)
    assert ledger.steps == 2 * steps
    assert ledger.epsilon(1e-5) == pytest.approx(_truth(2 * steps), rel=1e-9)


def test_a_fresh_model_with_the_same_architecture_keeps_its_own_ledger():
    trained = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    _train(trained)
    fresh = _private(keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)]))
    ledger = _train(fresh)
    assert ledger is not get_ledger(trained)
    assert ledger.steps == get_ledger(trained).steps


def test_variables_trained_under_two_ledgers_are_refused():
    a, c = keras.layers.Dense(3), keras.layers.Dense(3)
    _train(_private(keras.Sequential([keras.Input((5,)), a, keras.layers.Dense(2)])))
    _train(_private(keras.Sequential([keras.Input((5,)), c, keras.layers.Dense(2)])))
    inputs = keras.Input((5,))
    both = _private(
        keras.Model(
            inputs, keras.layers.Dense(2)(keras.layers.Concatenate()([a(inputs), c(inputs)]))
        )
    )
    before = [np.array(v) for v in both.trainable_weights]
    with pytest.raises(PrivacyError, match="both ledgers have spent"):
        both.fit(X, Y, batch_size=B, verbose=0)
    for b, v in zip(before, both.trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))
