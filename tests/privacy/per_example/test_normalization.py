"""LayerNormalization and GroupNormalization rules; frozen BatchNormalization."""

import keras

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
