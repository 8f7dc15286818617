"""keras_safe.testing.assert_dp_matches_reference: it passes what is right and catches what
is not (a test helper that cannot fail would be worthless)."""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe._validation import ArgumentError
from keras_safe.privacy.per_example import PerExampleRule, summed_form
from keras_safe.privacy.per_example.registry import unregister_rule
from keras_safe.testing import assert_dp_matches_reference

RNG = np.random.default_rng(4)


class Shift(keras.layers.Layer):
    """`y = x + b`, one offset per feature."""

    def build(self, input_shape):
        self.b = self.add_weight(shape=input_shape[-1:], initializer="zeros", name="b")

    def call(self, x):
        return x + self.b


class ShiftRule(PerExampleRule):
    @staticmethod
    def supports(layer):
        return type(layer) is Shift

    @staticmethod
    def forward(layer, record, x):
        z = x + layer.b
        record(x, z)
        return z

    @staticmethod
    def forms(layer, x, dz):
        return [summed_form(layer.b, dz, list(range(1, len(x.shape) - 1)))]


class HalfShiftRule(ShiftRule):
    """Wrong by a factor 2: the check must catch it."""

    @staticmethod
    def forms(layer, x, dz):
        return [summed_form(layer.b, dz * 0.5, list(range(1, len(x.shape) - 1)))]


def _model(loss="mse"):
    model = keras.Sequential(
        [keras.Input((3, 2)), Shift(), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model.compile(loss=loss)
    return model


@pytest.fixture
def rule():
    registered = []

    def use(r):
        registered.append(keras_safe.privacy.register_rule(r))

    yield use
    for r in registered:
        unregister_rule(r)


def test_a_correct_rule_passes_with_figures(rule):
    rule(ShiftRule)
    x, y = RNG.normal(size=(6, 3, 2)), RNG.normal(size=(6, 2))
    check = assert_dp_matches_reference(_model(), x, y)
    assert check.fallback is None and check.max_error < 1e-4
    assert 0.9 < check.max_sensitivity <= 1 + 1e-5  # the median clip bound is reached
    assert check.l2_norm_clip > 0


def test_a_wrong_rule_fails(rule):
    rule(HalfShiftRule)
    x, y = RNG.normal(size=(6, 3, 2)), RNG.normal(size=(6, 2))
    with pytest.raises(AssertionError, match="shift/b|below the reference"):
        assert_dp_matches_reference(_model(), x, y, fallback="vectorized")


def test_without_a_rule_the_verified_fallback_is_checked():
    x, y = RNG.normal(size=(6, 3, 2)), RNG.normal(size=(6, 2))
    check = assert_dp_matches_reference(_model(), x, y, l2_norm_clip=0.1)
    assert check.fallback == "vectorized" and check.l2_norm_clip == 0.1


def test_microbatches_and_sample_weights():
    x, y = RNG.normal(size=(8, 3, 2)), RNG.normal(size=(8, 2))
    weights = RNG.uniform(0.5, 2.0, 8)
    check = assert_dp_matches_reference(_model(), x, y, sample_weight=weights, num_microbatches=4)
    assert check.max_sensitivity <= 1 + 1e-5


def test_bad_arguments_name_the_argument():
    x, y = RNG.normal(size=(6, 3, 2)), RNG.normal(size=(6, 2))
    uncompiled = keras.Sequential([keras.Input((3, 2)), keras.layers.Dense(1)])
    with pytest.raises(ArgumentError, match="`model` must be a model compiled with a loss"):
        assert_dp_matches_reference(uncompiled, x, y)
    with pytest.raises(ArgumentError, match="`num_microbatches` must be a divisor"):
        assert_dp_matches_reference(_model(), x, y, num_microbatches=4)
