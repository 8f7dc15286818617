"""EinsumDense rule (and MultiHeadAttention, built from EinsumDense layers)."""

import keras

from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
)


def test_einsum_dense_with_bias_on_trailing_axes():
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3), bias_axes="de")
    assert_fit_matches_reference(classifier([layer], (4, 5)), RNG.normal(size=(B, 4, 5)), labels())


def test_einsum_dense_bias_on_some_of_the_trailing_axes():
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3), bias_axes="d")
    assert_fit_matches_reference(classifier([layer], (4, 5)), RNG.normal(size=(B, 4, 5)), labels())


def test_einsum_dense_summing_an_input_axis():
    # The sequence letter b is summed inside each example: the kernel gradient is a float sum.
    layer = keras.layers.EinsumDense("abc,cd->ad", output_shape=(3,), bias_axes="d")
    check = check_with_oracle(classifier([layer], (4, 5)), RNG.normal(size=(B, 4, 5)), labels())
    assert check.fallback is None


def test_multi_head_attention():
    inputs = keras.Input((5, 4))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5, 4)), labels())
