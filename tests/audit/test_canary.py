"""Canary audit: a memorising model is caught, a DP model stays below its accountant epsilon."""

import keras
import numpy as np
import pytest

from keras_safe.audit import accountant_epsilon, canary_audit
from tests.audit.conftest import digits, make_mlp

TARGET_EPSILON = 1.0
FIT = {"epochs": 15, "batch_size": 16}


def _data():
    x, y = digits()
    return x[:400], y[:400]


def _dp_model():
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
    result = canary_audit(
        _dp_model,
        x,
        y,
        num_canaries=100,
        canary_type="random",
        fit_kwargs={"epochs": 10, "batch_size": 50},
        seed=0,
    )
    assert result.delta == 1e-4  # taken from the DP optimizer
    assert result.accountant_epsilon == pytest.approx(TARGET_EPSILON, rel=0.1)
    assert result.epsilon_lower_bound <= result.accountant_epsilon, str(result)
    assert result.within_accountant_bound
    assert "accountant epsilon" in str(result)
    assert set(result.to_dict()) >= {"epsilon_lower_bound", "accountant_epsilon", "auc"}


def test_accountant_epsilon_matches_compute_epsilon():
    from keras_safe.optimizers import DPSGD
    from keras_safe.privacy import compute_epsilon, make_private

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = DPSGD(learning_rate=0.1, noise_multiplier=1.3, num_examples=64, batch_size=16)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    make_private(model)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(64, 3)), rng.integers(0, 2, 64), batch_size=16, epochs=2, verbose=0)
    expected = compute_epsilon(steps=8, sampling_rate=0.25, noise_multiplier=1.3, delta=1e-5)
    assert accountant_epsilon(model, 1e-5) == pytest.approx(expected)
    # Recompiled with another noise, the ledger composes both runs (not only the last one).
    model.compile(
        DPSGD(learning_rate=0.1, noise_multiplier=2.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(rng.normal(size=(64, 3)), rng.integers(0, 2, 64), batch_size=32, epochs=1, verbose=0)
    assert accountant_epsilon(model, 1e-5) > expected
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
