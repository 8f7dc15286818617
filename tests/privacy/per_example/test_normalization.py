"""LayerNormalization and GroupNormalization rules; frozen BatchNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe.privacy.per_example.numerics import gamma, unit_roundoff
from keras_safe.privacy.per_example.rules.normalization import GroupNormRule, LayerNormRule
from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
)


def test_layer_normalization():
    model = classifier([keras.layers.Dense(6), keras.layers.LayerNormalization()], (3, 4))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 3, 4)), labels())


def test_layer_normalization_over_two_axes():
    norm = keras.layers.LayerNormalization(axis=[-2, -1])
    check = check_with_oracle(classifier([norm], (3, 4)), RNG.normal(size=(B, 3, 4)), labels())
    assert check.fallback is None


def test_group_normalization():
    model = classifier(
        [keras.layers.Conv2D(4, 3), keras.layers.GroupNormalization(groups=2)], (6, 6, 2)
    )
    assert_fit_matches_reference(model, RNG.normal(size=(B, 6, 6, 2)), labels())


def test_frozen_batch_normalization_has_nothing_to_clip():
    norm = keras.layers.BatchNormalization()
    model = classifier([keras.layers.Dense(4), norm], (5,))
    norm.trainable = False
    check = check_with_oracle(model, RNG.normal(size=(B, 5)), labels())
    assert check.fallback is None


@pytest.mark.parametrize("layer_type", ["group", "layer"])
def test_rounding_bound_covers_sums_that_cancel(layer_type):
    # The scale and offset gradients are sums over positions; their rounding bound comes from
    # the factors' norms (Cauchy-Schwarz), and must cover the sum of |terms| even where the
    # terms cancel (1e8 - 1e8 + 1) and the float32 sum is off by a whole unit.
    if layer_type == "group":
        layer = keras.layers.GroupNormalization(groups=2)
        layer.build((None, 3, 2, 4))
        rule, shape = GroupNormRule, (3, 3, 2, 4)
    else:
        layer = keras.layers.LayerNormalization()
        layer.build((None, 6, 4))
        rule, shape = LayerNormRule, (3, 6, 4)
    normalized = RNG.normal(size=shape).astype("float32")
    dz = RNG.normal(size=shape).astype("float32")
    flat_n, flat_dz = normalized.reshape(3, -1, 4), dz.reshape(3, -1, 4)
    flat_dz[0, :3, 0] = [1e8, -1e8, 1.0]
    flat_n[0, :3, 1] = [1e8, 1.0, -1e8]
    flat_dz[0, :3, 1] = 1.0
    forms = rule.forms(layer, tf.constant(normalized), tf.constant(dz))
    for form, terms in zip(forms, [flat_n * flat_dz, flat_dz]):
        terms = terms.astype("float64")
        exact = np.linalg.norm(terms.sum(1), axis=1)
        magnitude = np.linalg.norm(np.abs(terms).sum(1), axis=1)
        computed, error = form.materialise()
        computed = np.linalg.norm(np.asarray(computed, "float64").reshape(3, -1), axis=1)
        needed = gamma(terms.shape[1], unit_roundoff("float32")) * magnitude
        assert np.all(np.asarray(error) >= needed)
        assert np.all(computed + np.asarray(error) >= exact)
        assert np.all(np.asarray(error) <= 20 * needed + 1e-30)  # not far above what it covers
