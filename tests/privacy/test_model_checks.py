"""Model checks: the table of layers DP-SGD refuses, the fixes, the layer walker."""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.privacy.model_checks import CHECKS, all_layers, check_supported, validate

RNG = np.random.default_rng(2)


def _dp():
    return keras_safe.optimizers.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0)


def test_every_check_has_a_reason_and_advice():
    assert len(CHECKS) >= 3
    for check in CHECKS:
        assert check.reason.endswith(".") and check.advice.endswith(".")


def test_stateful_recurrent_layers_are_refused():
    model = keras.Sequential(
        [keras.Input((3, 2), batch_size=4), keras.layers.LSTM(2, stateful=True)]
    )
    problems = validate(model)
    assert [p.class_name for p in problems] == ["LSTM"]
    assert "stateful=False" in problems[0].fix
    with pytest.raises(ValueError, match="No automatic fix"):
        validate(model, fix=True)
    with pytest.raises(PrivacyError, match="stateful recurrent layer"):
        check_supported(model)


def test_stateful_layer_inside_a_wrapper_is_found():
    inner = keras.layers.GRU(2, stateful=True)
    model = keras.Sequential([keras.Input((3, 2), batch_size=4), keras.layers.Bidirectional(inner)])
    assert "GRU" in {p.class_name for p in validate(model)}


def test_fit_refuses_a_stateful_model():
    # The state carried from batch to batch makes one example's gradient depend on others.
    model = keras.Sequential(
        [
            keras.Input((3, 2), batch_size=4),
            keras.layers.SimpleRNN(2, stateful=True),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=_dp(), loss="mse")
    keras_safe.privacy.make_private(model)
    before = [np.array(v) for v in model.trainable_variables]
    with pytest.raises(PrivacyError, match="stateful"):
        model.fit(RNG.normal(size=(8, 3, 2)), RNG.normal(size=(8, 1)), batch_size=4, verbose=0)
    after = [np.array(v) for v in model.trainable_variables]
    assert all(np.array_equal(b, a) for b, a in zip(before, after))


def test_batch_norm_fix_keeps_the_other_layers():
    dense = keras.layers.Dense(4)
    model = keras.Sequential(
        [keras.Input((6,)), dense, keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    fixed = validate(model, fix=True)
    assert validate(fixed) == []
    assert any(isinstance(layer, keras.layers.GroupNormalization) for layer in fixed.layers)
    assert fixed.layers[0] is dense  # shared, with its weights


def test_all_layers_walks_nested_models_wrappers_and_attributes():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.parts = [keras.layers.Dense(2), keras.layers.Dense(2)]

        def call(self, x):
            return self.parts[1](self.parts[0](x))

    inner = keras.Sequential([keras.Input((3,)), Block()])
    model = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1)])
    kinds = [type(layer).__name__ for layer in all_layers(model)]
    assert kinds == ["Sequential", "Block", "Dense", "Dense", "Dense"]
    assert len({id(layer) for layer in all_layers(model)}) == len(kinds)  # each once
