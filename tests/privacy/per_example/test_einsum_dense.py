"""EinsumDense rule (and MultiHeadAttention, built from EinsumDense layers)."""

import keras
import pytest
import tensorflow as tf

from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example.clipping import per_example_forms
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


@pytest.mark.parametrize(
    "equation, input_shape, output_shape",
    [
        ("ab,bc->ac", (5,), (3,)),  # one position: Dense's product form
        ("abcd,de->abce", (3, 2, 4), (3, 2, 5)),  # two position letters
    ],
)
def test_dense_shaped_equations(equation, input_shape, output_shape):
    # Equations of the form b P C, C O -> b P O are a Dense layer over the positions P: the
    # rule gives them the Dense layer's outer-product form.
    layer = keras.layers.EinsumDense(equation, output_shape=output_shape, bias_axes=equation[-1])
    model = classifier([layer], input_shape)
    x = RNG.normal(size=(B, *input_shape))
    assert_fit_matches_reference(model, x, labels())
    assert _form_kinds(model, x)[layer.kernel.path] == "OuterProductGrad"


def test_multi_head_attention_projections_take_the_outer_product_form():
    inputs = keras.Input((5, 4))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))
    kinds = _form_kinds(model, RNG.normal(size=(B, 5, 4)))
    kernels = [path for path in kinds if "multi_head_attention" in path and "kernel" in path]
    assert len(kernels) == 4 and all(kinds[p] == "OuterProductGrad" for p in kernels)


def test_multi_head_attention_in_microbatches():
    inputs = keras.Input((5, 4))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5, 4)), labels(), microbatches=B // 2)


def _form_kinds(model, x):
    """`{variable path: form class name}` of the per-example forms of a batch of `x`."""
    loss = PerExampleLoss(model) if model.compiled else None
    if loss is None:
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        loss = PerExampleLoss(model)
    y = tf.constant(labels(count=len(x)))
    found = {}

    @tf.function
    def trace(x):
        result = per_example_forms(
            model, model.trainable_variables, lambda: (loss(y, model(x, training=True)), None)
        )
        for variable, form in zip(model.trainable_variables, result.forms):
            found[variable.path] = type(form).__name__
        return 0

    trace(tf.constant(x, "float32"))
    return found
