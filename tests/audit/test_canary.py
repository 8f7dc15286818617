"""Canary audit: a memorising model is caught, a DP model stays below its accountant epsilon.

The accountant epsilon of a trained model is compared with dp-accounting called directly
(`tests.dp_reference`) on the steps that training took.
"""

import math

import keras
import numpy as np
import pytest

from keras_safe.audit import canary_audit
from keras_safe.audit.canary import accountant_epsilon
from tests import dp_reference
from tests.audit.conftest import digits, make_mlp

TARGET_EPSILON = 1.0
FIT = {"epochs": 15, "batch_size": 16}


def _data():
    x, y = digits()
    return x[:400], y[:400]


def _dp_model(built=None):
    from keras_safe.optimizers import DPSGD
    from keras_safe.privacy import make_private

    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=DPSGD(
            learning_rate=0.5,
            l2_norm_clip=1.0,
            target_epsilon=TARGET_EPSILON,
            batch_size=50,
            epochs=10,
            delta=1e-4,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if built is not None:
        built.append(model)
    return make_private(model)


def test_memorising_model_exceeds_the_dp_claim():
    """Without DP the audit certifies more than TARGET_EPSILON: the audit has the power to fail."""
    x, y = _data()
    result = canary_audit(
        make_mlp, x, y, num_canaries=100, canary_type="random", fit_kwargs=FIT, seed=0
    )
    assert result.accountant_epsilon is None and result.within_accountant_bound
    assert result.epsilon_lower_bound > TARGET_EPSILON, str(result)
    assert result.auc > 0.8
    best = result.best_test
    assert best["num_correct"] > 0.8 * best["num_guesses"]
    assert result.included.sum() + (~result.included).sum() == 100


def test_dp_model_stays_below_the_accountant():
    x, y = _data()
    built = []
    result = canary_audit(
        lambda: _dp_model(built),
        x,
        y,
        num_canaries=100,
        canary_type="random",
        fit_kwargs={"epochs": 10, "batch_size": 50},
        seed=0,
    )
    assert result.delta == 1e-4  # taken from the DP optimizer
    # The audited model trained on the data and the included canaries: 10 epochs of
    # ceil(n / 50) steps at rate 50 / n, with the noise calibrated for the target.
    n = len(x) + int(result.included.sum())
    noise = built[0].optimizer.noise_multiplier
    expected = dp_reference.epsilon(noise, 50 / n, 10 * math.ceil(n / 50), 1e-4)
    assert expected <= TARGET_EPSILON
    assert result.accountant_epsilon <= expected * (1 + 1e-6)
    assert result.accountant_epsilon >= expected * (1 - 1e-6)
    assert result.epsilon_lower_bound <= result.accountant_epsilon, str(result)
    assert result.within_accountant_bound
    assert "accountant epsilon" in str(result)
    assert set(result.to_dict()) >= {"epsilon_lower_bound", "accountant_epsilon", "auc"}


def test_accountant_epsilon_is_the_dp_accounting_epsilon_of_the_steps_taken():
    from keras_safe.optimizers import DPSGD
    from keras_safe.privacy import make_private

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = DPSGD(learning_rate=0.1, noise_multiplier=1.3, num_examples=64, batch_size=16)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    make_private(model)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(64, 3)), rng.integers(0, 2, 64), batch_size=16, epochs=2, verbose=0)
    # 2 epochs of 4 steps at rate 16 / 64.
    expected = dp_reference.epsilon(1.3, 0.25, 8, 1e-5)
    assert accountant_epsilon(model, 1e-5) == pytest.approx(expected, rel=1e-6)
    # Recompiled with another noise, the ledger composes both runs (not only the last one):
    # 2 more steps at rate 32 / 64.
    model.compile(
        DPSGD(learning_rate=0.1, noise_multiplier=2.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(rng.normal(size=(64, 3)), rng.integers(0, 2, 64), batch_size=32, epochs=1, verbose=0)
    both = dp_reference.dp_sgd_epsilon([(1.3, 0.25, 8), (2.0, 0.5, 2)], 1e-5)
    assert accountant_epsilon(model, 1e-5) == pytest.approx(both, rel=1e-6)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert accountant_epsilon(plain, 1e-5) is None


def test_bad_input_raises():
    x, y = _data()
    with pytest.raises(ValueError, match="model_factory"):
        canary_audit(make_mlp(), x, y)
    with pytest.raises(ValueError, match="num_canaries"):
        canary_audit(make_mlp, x, y, num_canaries=1)
    with pytest.raises(ValueError, match="num_canaries"):
        canary_audit(make_mlp, x[:10], y[:10], num_canaries=10)
    with pytest.raises(ValueError, match="canary_type"):
        canary_audit(make_mlp, x, y, canary_type="noise")
    with pytest.raises(ValueError, match="guess_fractions"):
        canary_audit(make_mlp, x, y, guess_fractions=(0.0,))
    with pytest.raises(ValueError, match="labels"):
        canary_audit(make_mlp, x, y[:5])
