"""The rule registry: order, registration, and that registered rules are verified."""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example import (
    DEFAULT_RULES,
    DenseRule,
    TapRule,
    find_rule,
    register_tap,
    registered_rules,
    summed_form,
    unregister_tap,
    verify,
)

RNG = np.random.default_rng(5)


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal", name="w")

    def call(self, x):
        return x * self.w


class ScaleRule(TapRule):
    @staticmethod
    def supports(layer):
        return type(layer) is Scale

    @staticmethod
    def forward(layer, record, x):
        z = x * layer.w
        record(x, z)
        return z

    @staticmethod
    def forms(layer, x, dz):
        return [summed_form(layer.w, x * dz, list(range(1, len(x.shape) - 1)))]


class WrongScaleRule(ScaleRule):
    """Forgets every position but the first: each example's gradient is wrong."""

    @staticmethod
    def forms(layer, x, dz):
        return [summed_form(layer.w, x[:, :1] * dz[:, :1], [1])]


@pytest.fixture
def registered():
    added = []

    def add(rule):
        added.append(register_tap(rule))
        return rule

    yield add
    for rule in added:
        if rule in registered_rules()[: -len(DEFAULT_RULES)]:
            unregister_tap(rule)


def _model():
    model = keras.Sequential(
        [keras.Input((4, 3)), Scale(), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_default_rules_are_an_explicit_ordered_list():
    assert registered_rules() == DEFAULT_RULES
    assert find_rule(keras.layers.Dense(2)) is DenseRule
    assert find_rule(keras.layers.Flatten()) is None


def test_registered_rules_come_first_latest_first(registered):
    class DenseAgain(DenseRule):
        pass

    registered(ScaleRule)
    registered(DenseAgain)
    assert registered_rules()[:2] == (DenseAgain, ScaleRule)
    assert find_rule(keras.layers.Dense(2)) is DenseAgain  # a user rule can take over
    registered(ScaleRule)  # registering again moves it to the front
    assert registered_rules()[:2] == (ScaleRule, DenseAgain)


def test_register_tap_names_a_missing_method():
    class Incomplete:
        @staticmethod
        def supports(layer):
            return False

    with pytest.raises(ArgumentError, match="`rule` must be .*Fix: define forward, forms"):
        register_tap(Incomplete)
    with pytest.raises(ArgumentError, match="`rule` must be a rule added by register_tap"):
        unregister_tap(ScaleRule)


def test_a_registered_rule_is_verified_and_used(registered):
    registered(ScaleRule)
    model = _model()
    x, y = RNG.normal(size=(5, 4, 3)), RNG.integers(0, 2, 5)
    found = verify(model, PerExampleLoss(model), x, y)
    assert found.checked_rules == ("ScaleRule",) and found.fallback is None
    check = keras_safe.testing.assert_dp_matches_reference(model, x, y)
    assert check.fallback is None and check.max_sensitivity <= 1 + 1e-5


def test_a_wrong_registered_rule_is_refused(registered):
    registered(WrongScaleRule)
    model = _model()
    x, y = RNG.normal(size=(5, 4, 3)), RNG.integers(0, 2, 5)
    with pytest.raises(PrivacyError, match="WrongScaleRule.*scale/w"):
        verify(model, PerExampleLoss(model), x, y)
    # The oracle names the variable whose clipped sum the wrong rule gets wrong.
    with pytest.raises(AssertionError, match="scale/w: keras_safe's clipped sum is .* away from"):
        keras_safe.testing.assert_dp_matches_reference(model, x, y, fallback="vectorized")
