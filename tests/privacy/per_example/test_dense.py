"""Dense rule: one DP step against the one-example-at-a-time reference."""

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

CASES = {
    "dense": lambda: (
        classifier([keras.layers.Dense(5, activation="tanh")], (6,)),
        RNG.normal(size=(B, 6)),
    ),
    "dense_on_sequence": lambda: (
        classifier([keras.layers.Dense(5, activation="relu")], (4, 6)),
        RNG.normal(size=(B, 4, 6)),
    ),
    "dense_long_sequence_gram": lambda: (
        classifier([keras.layers.Dense(40)], (3, 50)),
        RNG.normal(size=(B, 3, 50)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_step_matches_one_example_loop(case):
    model, x = CASES[case]()
    assert_fit_matches_reference(model, x, labels())


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_on_rank_four_inputs(use_bias):
    model = classifier([keras.layers.Dense(3, use_bias=use_bias)], (2, 3, 4))
    check = check_with_oracle(model, RNG.normal(size=(B, 2, 3, 4)), labels())
    assert check.fallback is None and check.max_sensitivity <= 1 + 1e-5


def test_layer_called_twice_shares_one_gradient():
    shared = keras.layers.Dense(4, activation="tanh")
    a, b = keras.Input((3,)), keras.Input((3,))
    merged = keras.layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model([a, b], keras.layers.Dense(2)(merged))
    x = [RNG.normal(size=(B, 3)), RNG.normal(size=(B, 3))]
    assert_fit_matches_reference(model, x, labels(2))
