"""PReLU rule."""

import keras
import pytest

from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
)


def test_prelu_after_dense():
    model = classifier([keras.layers.Dense(4), keras.layers.PReLU()], (5,))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5)), labels())


@pytest.mark.parametrize("shared_axes", [None, [1], [1, 2]])
def test_prelu_with_shared_axes(shared_axes):
    layers = [keras.layers.Conv2D(2, 2), keras.layers.PReLU(shared_axes=shared_axes)]
    x = RNG.normal(size=(B, 4, 4, 1))
    check = check_with_oracle(classifier(layers, (4, 4, 1)), x, labels())
    assert check.fallback is None
