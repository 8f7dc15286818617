"""LoRA rules: Dense, EinsumDense (MultiHeadAttention projections) and Embedding with adapters.

Every model is checked with the public oracle: the clipped sum equals the one-example-at-a-time
reference within 1e-4 relative, no norm is below the reference's, and removing one example moves
the sum by at most C (1 + 1e-5). The adapters get random `B` factors (Keras starts them at 0,
where `A`'s gradient is 0) and a `lora_alpha` other than the rank, so the scale counts.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe.privacy.per_example.registry import find_rule
from keras_safe.privacy.per_example.rules import (
    DenseRule,
    EinsumDenseRule,
    LoRADenseRule,
    LoRAEinsumDenseRule,
    LoRAEmbeddingRule,
)
from keras_safe.privacy.per_example.rules.lora import einsum_layout, low_rank_forms
from tests.privacy.per_example.common import RNG, B, assert_fit_matches_reference, labels

L = keras.layers
RANK, ALPHA = 2, 3


def adapt(layer, frozen=True, rank=RANK, alpha=ALPHA):
    """Enables LoRA on a built layer with random adapters; `frozen=False` trains the base too."""
    layer.enable_lora(rank, lora_alpha=alpha)
    for variable in layer.weights:
        if variable.name.startswith("lora_"):
            variable.assign(RNG.normal(size=variable.shape) * 0.5)
        elif not frozen:
            variable.trainable = True
    return layer


def _model(inputs, h, frozen, *layers):
    for layer in layers:
        adapt(layer, frozen)
    if len(h.shape) > 2:
        h = L.Flatten()(h)
    model = keras.Model(inputs, L.Dense(3)(h))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def dense(frozen):
    inputs = keras.Input((5,))
    layer = L.Dense(4, activation="tanh")
    return _model(inputs, layer(inputs), frozen, layer), RNG.normal(size=(B, 5)), [layer]


def dense_sequence(frozen):
    inputs = keras.Input((4, 5))
    layer = L.Dense(3, use_bias=False)
    return _model(inputs, layer(inputs), frozen, layer), RNG.normal(size=(B, 4, 5)), [layer]


def einsum(frozen):
    inputs = keras.Input((4, 5))
    layer = L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de")
    return _model(inputs, layer(inputs), frozen, layer), RNG.normal(size=(B, 4, 5)), [layer]


def einsum_output_letters_first(frozen):
    # The kernel leads with the output's letter: its first factor is the output gradient.
    inputs = keras.Input((4, 5))
    layer = L.EinsumDense("abc,dc->abd", (4, 3), bias_axes="d")
    return _model(inputs, layer(inputs), frozen, layer), RNG.normal(size=(B, 4, 5)), [layer]


def einsum_transposed(frozen):
    # The input's and the output's letters in another order than the kernel's.
    inputs = keras.Input((5, 4))
    layer = L.EinsumDense("acb,cde->adbe", (2, 4, 3), bias_axes="e")
    return _model(inputs, layer(inputs), frozen, layer), RNG.normal(size=(B, 5, 4)), [layer]


def attention(frozen):
    inputs = keras.Input((4, 6))
    layer = L.MultiHeadAttention(num_heads=2, key_dim=3)
    h = L.GlobalAveragePooling1D()(layer(inputs, inputs))
    projections = [layer.query_dense, layer.value_dense]
    return _model(inputs, h, frozen, *projections), RNG.normal(size=(B, 4, 6)), projections


def embedding(frozen):
    inputs = keras.Input((9,), dtype="int32")
    layer = L.Embedding(7, 3)
    h = L.GlobalAveragePooling1D()(layer(inputs))
    ids = RNG.integers(0, 7, (B, 9))
    ids[:, 1] = ids[:, 0]  # every example repeats an id
    return _model(inputs, h, frozen, layer), ids, [layer]


CASES = {
    "dense": (dense, LoRADenseRule),
    "dense_sequence": (dense_sequence, LoRADenseRule),
    "einsum": (einsum, LoRAEinsumDenseRule),
    "einsum_output_letters_first": (einsum_output_letters_first, LoRAEinsumDenseRule),
    "einsum_transposed": (einsum_transposed, LoRAEinsumDenseRule),
    "multi_head_attention": (attention, LoRAEinsumDenseRule),
    "embedding": (embedding, LoRAEmbeddingRule),
}


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_base", "trained_base"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_clipped_sum_matches_one_example_at_a_time(name, frozen):
    factory, rule = CASES[name]
    model, x, adapted = factory(frozen)
    for layer in adapted:
        assert find_rule(layer) is rule
        base = "embeddings" if rule is LoRAEmbeddingRule else "kernel"
        trained = {w.name for w in layer.trainable_weights}
        assert (base in trained) is not frozen
        assert len([n for n in trained if n.startswith("lora_")]) == 2
    check = keras_safe.testing.assert_dp_matches_reference(model, x, labels())
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5
    assert check.max_sensitivity > 0.9  # the clip bound (the median norm) is reached
    assert check.fallback is None, "a LoRA layer went to the Jacobian fallback"


def test_layer_called_twice_and_microbatches():
    # Two calls of one layer join their forms; microbatches group them.
    inputs = keras.Input((3, 5))
    layer = L.Dense(5, activation="tanh")
    h = layer(layer(inputs))
    model = _model(inputs, h, True, layer)
    x, y = RNG.normal(size=(B, 3, 5)), labels()
    for microbatches in (None, 4):
        check = keras_safe.testing.assert_dp_matches_reference(
            model, x, y, num_microbatches=microbatches
        )
        assert check.max_error < 1e-4 and 0.9 < check.max_sensitivity <= 1 + 1e-5
        assert check.fallback is None


def test_fit_step_moves_the_adapters_by_the_reference_update():
    inputs = keras.Input((4, 6))
    layer = L.MultiHeadAttention(num_heads=2, key_dim=3)
    h = L.GlobalAveragePooling1D()(layer(inputs, inputs))
    ff = L.Dense(4, activation="relu")
    h = ff(h)
    model = keras.Model(inputs, L.Dense(3)(h))
    for adapted in (layer.query_dense, layer.value_dense, ff):
        adapt(adapted)
    assert_fit_matches_reference(model, RNG.normal(size=(B, 4, 6)), labels())


def test_equation_outside_the_outer_product_goes_to_the_verified_fallback():
    # The position letter b is summed inside the layer: no outer product over positions.
    assert einsum_layout("abc,cd->ad") is None
    inputs = keras.Input((4, 5))
    layer = L.EinsumDense("abc,cd->ad", (3,), bias_axes="d")
    model = _model(inputs, layer(inputs), True, layer)
    assert find_rule(layer) is None
    check = keras_safe.testing.assert_dp_matches_reference(
        model, RNG.normal(size=(B, 4, 5)), labels()
    )
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5
    assert check.fallback in ("vectorized", "loop")


def test_einsum_layouts_of_attention_projections():
    # Query/key/value: the input's letter c leads the kernel, then the heads and their width.
    assert einsum_layout("abc,cde->abde") == ([0, 1, 2], [0, 1, 2, 3], True, 1)
    # Output projection: heads and width from the input, the model width from the output.
    assert einsum_layout("abcd,cde->abe") == ([0, 1, 2, 3], [0, 1, 2], True, 2)
    # Letters in another order than the kernel's: transposed to it.
    assert einsum_layout("acb,cde->adbe") == ([0, 2, 1], [0, 2, 1, 3], True, 1)
    assert einsum_layout("ab,bcd->adc") == ([0, 1], [0, 2, 1], True, 1)
    for equation in ("...b,bc->...c", "ab,ab->a", "abc,cb->abc", "abc,cd->abdc"):
        assert einsum_layout(equation) is None, equation


def test_subclass_with_its_own_call_or_no_lora_is_not_taken_for_a_lora_layer():
    class Doubled(L.Dense):
        def call(self, inputs):
            return super().call(inputs) * 2.0

    layer = Doubled(3)
    layer.build((None, 4))
    adapt(layer)
    assert find_rule(layer) is None  # verified fallback, never trusted
    plain = L.Dense(3)
    plain.build((None, 4))
    assert find_rule(plain) is DenseRule
    einsum_layer = L.EinsumDense("ab,bc->ac", (3,))
    einsum_layer.build((None, 4))
    assert find_rule(einsum_layer) is EinsumDenseRule
    assert find_rule(adapt(einsum_layer)) is LoRAEinsumDenseRule


def test_norm_bound_covers_a_projection_that_cancels():
    # The second factor projected on B sums 2^24 + 1 - 2^24: float32 gives 0, the exact value
    # is 1, so the computed A-gradient is 0 where the exact one is x * s. The projection's
    # rounding bound keeps the norm bound above the exact norm.
    x = tf.constant([[[1.0, 2.0]]])  # [B=1, T=1, F=2]
    e = tf.constant([[[[2.0**24, 1.0, -(2.0**24)]]]])  # [B, T, S=1, L=3]
    kernel = keras.Variable(np.zeros((2, 3)), trainable=False, dtype="float32")
    lora_a = keras.Variable(np.ones((2, 1)), dtype="float32")
    lora_b = keras.Variable(np.ones((1, 3)), dtype="float32")
    scale = 1.5
    assert float(tf.einsum("btsl,rl->btsr", e, tf.constant(lora_b))[0, 0, 0, 0]) == 0.0
    a_form = low_rank_forms(kernel, lora_a, lora_b, scale, x, e)[0]
    assert a_form.variable is lora_a
    exact = scale * np.linalg.norm([1.0, 2.0])  # ||x (s e B^T)^T||, with e B^T = 1
    norms_sq, _ = a_form.norm_bounds()
    assert float(tf.sqrt(norms_sq)[0]) >= exact
    # The clipped sum is the computed gradient (0 here); grouping keeps the bound.
    grouped_sq, _ = a_form.group(1).norm_bounds()
    assert float(tf.sqrt(grouped_sq)[0]) >= exact
    rows, error = a_form.materialise()
    assert float(tf.norm(rows)) + float(error[0]) >= exact
