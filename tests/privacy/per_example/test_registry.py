"""The rule registry: order, registration, and that registered rules are verified."""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example import PerExampleRule, summed_form
from keras_safe.privacy.per_example.registry import (
    DEFAULT_RULES,
    find_rule,
    get_rule,
    is_builtin,
    lookup_order,
    register_rule,
    rule_names,
    unregister_rule,
)
from keras_safe.privacy.per_example.rules import DenseRule
from keras_safe.privacy.per_example.verification import verify

RNG = np.random.default_rng(5)


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal", name="w")

    def call(self, x):
        return x * self.w


class ScaleRule(PerExampleRule):
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
        added.append(register_rule(rule))
        return rule

    yield add
    for rule in added:
        if rule in lookup_order()[: -len(DEFAULT_RULES)]:
            unregister_rule(rule)


def _model():
    model = keras.Sequential(
        [keras.Input((4, 3)), Scale(), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_default_rules_are_an_explicit_ordered_list():
    assert lookup_order() == DEFAULT_RULES
    assert find_rule(keras.layers.Dense(2)) is DenseRule
    assert find_rule(keras.layers.Flatten()) is None


def test_registered_rules_come_first_latest_first(registered):
    class DenseAgain(DenseRule):
        pass

    registered(ScaleRule)
    registered(DenseAgain)
    assert lookup_order()[:2] == (DenseAgain, ScaleRule)
    assert find_rule(keras.layers.Dense(2)) is DenseAgain  # a user rule can take over
    with pytest.raises(ArgumentError, match="not registered yet.*replace=True"):
        register_rule(ScaleRule)  # nothing is replaced silently
    register_rule(ScaleRule, replace=True)  # on purpose: it moves to the front
    assert lookup_order()[:2] == (ScaleRule, DenseAgain)


def test_a_rule_registered_under_a_built_in_name_replaces_it_until_unregistered():
    class DenseRule(PerExampleRule):  # the built-in rule's name, on purpose
        supports = staticmethod(lambda layer: False)
        forward = forms = staticmethod(lambda *args: None)

    with pytest.raises(ArgumentError, match="not registered yet"):
        register_rule(DenseRule)
    register_rule(DenseRule, replace=True)
    try:
        assert find_rule(keras.layers.Dense(2)) is None  # the built-in one is not tried
        assert not is_builtin(get_rule("DenseRule"))
    finally:
        unregister_rule("DenseRule")
    assert find_rule(keras.layers.Dense(2)) is get_rule("DenseRule") is DEFAULT_RULES[0]
    assert rule_names()[: len(DEFAULT_RULES)] == tuple(r.__name__ for r in DEFAULT_RULES)


def test_register_rule_names_a_missing_method():
    class Incomplete:
        @staticmethod
        def supports(layer):
            return False

    with pytest.raises(ArgumentError, match="`rule` must be .*Fix: define forward, forms"):
        register_rule(Incomplete)
    with pytest.raises(ArgumentError, match="registered with keras_safe.privacy.register_rule"):
        unregister_rule(ScaleRule)
    with pytest.raises(ArgumentError, match="built-in ones cannot be removed"):
        unregister_rule("DenseRule")


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
