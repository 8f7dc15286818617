"""The layer catalog: every Keras layer with trainable weights that DP-SGD accepts.

For each, the clipped gradient sum of a small batch equals the one-example-at-a-time reference
within 1e-4 relative, and removing any one example moves it by at most C (1 + 1e-5): the public
oracle `keras_safe.testing.assert_dp_matches_reference`. Layers with a rule must not need the
Jacobian fallback; the others go through the verified fallback.
"""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe.privacy.per_example import PerExampleRule, summed_form

L = keras.layers
RNG = np.random.default_rng(7)
B = 6


class Scale(L.Layer):
    """A user's layer: `y = x * w`, one weight per feature."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal")

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


class Bilinear(L.Layer):
    """A user's layer without a rule: `y = (x * w) @ v` (goes to the fallback)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal")
        self.v = self.add_weight(shape=(input_shape[-1], 3), initializer="random_normal")

    def call(self, x):
        return keras.ops.matmul(x * self.w, self.v)


def _chain(*layers):
    def apply(h):
        for layer in layers:
            h = layer(h)
        return h

    return apply


def _frozen_batch_norm():
    return L.BatchNormalization(trainable=False)


def _self_attention(layer):
    return lambda h: layer(h, h)


def _pair(layer):
    return lambda h: layer([h, h])


def _lora(layer, parts=None):
    """LoRA (rank 2, alpha 4) on `layer` (or its sublayers `parts`), random adapters."""

    def apply(*h):
        out = layer(*h)
        for part in parts(layer) if parts else [layer]:
            part.enable_lora(2, lora_alpha=4)
            for v in part.weights:
                if v.name.startswith("lora_"):
                    v.assign(RNG.normal(size=v.shape) * 0.5)
        return out

    return apply


def _query_value(attention):
    return [attention.query_dense, attention.value_dense]


def _ids(shape, vocabulary):
    ids = RNG.integers(0, vocabulary, (B, *shape))
    ids[:, 1] = ids[:, 0]  # every example repeats an id
    return ids


# name: (input shape, a factory of the layer (or of a function of the input tensor), whether
# every weight has a rule)
CATALOG = {
    "dense": ((5,), lambda: L.Dense(4, activation="tanh"), True),
    "dense_sequence_no_bias": ((4, 5), lambda: L.Dense(3, use_bias=False), True),
    "einsum": ((4, 5), lambda: L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de"), True),
    "conv1d_strides": ((9, 3), lambda: L.Conv1D(3, 3, strides=2), True),
    "conv1d_groups_causal": ((8, 4), lambda: L.Conv1D(6, 3, groups=2, padding="causal"), True),
    "conv1d_dilated_causal": ((9, 2), lambda: L.Conv1D(2, 2, 1, "causal", dilation_rate=3), True),
    "conv2d_dilated": ((6, 6, 2), lambda: L.Conv2D(3, 2, dilation_rate=2), True),
    "conv2d_groups": ((6, 6, 4), lambda: L.Conv2D(4, 3, groups=2, padding="same"), True),
    "conv2d_groups_strided": ((5, 5, 8), lambda: L.Conv2D(4, 2, groups=4, strides=2), True),
    "conv3d_strides": ((4, 4, 4, 2), lambda: L.Conv3D(3, 2, strides=(1, 2, 1)), True),
    "conv3d_groups": ((5, 4, 4, 8), lambda: L.Conv3D(4, 2, dilation_rate=2, groups=2), True),
    "conv3d_many_channels": ((4, 4, 3, 8), lambda: L.Conv3D(2, 2, padding="same"), True),
    "depthwise_conv2d": ((6, 6, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=2), True),
    "depthwise_conv1d": ((9, 3), lambda: L.DepthwiseConv1D(3, strides=2, padding="same"), True),
    "separable_conv2d": ((6, 6, 3), lambda: L.SeparableConv2D(4, 3, depth_multiplier=2), True),
    "separable_conv1d": ((10, 3), lambda: L.SeparableConv1D(4, 3, dilation_rate=2), True),
    "conv1d_transpose": ((5, 3), lambda: L.Conv1DTranspose(4, 3, strides=2), True),
    "conv2d_transpose": ((4, 4, 3), lambda: L.Conv2DTranspose(4, 3, 2, padding="same"), True),
    "conv3d_transpose": ((3, 3, 3, 2), lambda: L.Conv3DTranspose(2, 2), True),
    "embedding_short": ((3,), lambda: L.Embedding(4, 3), True),
    "embedding_long": ((12,), lambda: _chain(L.Embedding(5, 3), L.GlobalAveragePooling1D()), True),
    "layer_normalization": ((3, 4), lambda: _chain(L.Dense(4), L.LayerNormalization()), True),
    "group_normalization": ((4, 4, 4), lambda: L.GroupNormalization(groups=2), True),
    "frozen_batch_normalization": ((5,), lambda: _chain(L.Dense(4), _frozen_batch_norm()), True),
    "simple_rnn": ((4, 3), lambda: L.SimpleRNN(3), True),
    "lstm": ((4, 3), lambda: L.LSTM(3, return_sequences=True), True),
    "gru": ((4, 3), lambda: L.GRU(3), True),
    "gru_reset_before": ((4, 3), lambda: L.GRU(2, reset_after=False), True),
    "bidirectional": ((4, 3), lambda: L.Bidirectional(L.LSTM(2)), True),
    "time_distributed": ((3, 4), lambda: L.TimeDistributed(L.Dense(2)), True),
    "multi_head_attention": ((4, 3), lambda: _self_attention(L.MultiHeadAttention(2, 2)), True),
    "prelu": ((3, 4), lambda: L.PReLU(shared_axes=[1]), True),
    "dense_lora": ((4, 5), lambda: _lora(L.Dense(3, activation="tanh")), True),
    "einsum_lora": (
        (4, 5),
        lambda: _lora(L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="e")),
        True,
    ),
    "embedding_lora": ((6,), lambda: _chain(_lora(L.Embedding(5, 3)), L.Flatten()), True),
    "multi_head_attention_lora": (
        (4, 3),
        lambda: _self_attention(_lora(L.MultiHeadAttention(2, 2), _query_value)),
        True,
    ),
    "custom_layer_with_rule": ((3, 4), lambda: Scale(), True),
    "custom_layer_without_rule": ((4,), lambda: Bilinear(), False),
    "additive_attention": ((3, 4), lambda: _pair(L.AdditiveAttention(use_scale=True)), False),
}
INTEGER_INPUTS = {"embedding_short": 4, "embedding_long": 5, "embedding_lora": 5}


@pytest.fixture
def scale_rule():
    keras_safe.privacy.register_rule(ScaleRule)
    yield
    keras_safe.privacy.unregister_rule(ScaleRule)


def _model(name):
    shape, factory, _ = CATALOG[name]
    dtype = "int32" if name in INTEGER_INPUTS else "float32"
    inputs = keras.Input(shape, dtype=dtype)
    h = factory()(inputs)
    if len(h.shape) > 2:
        h = L.Flatten()(h)
    model = keras.Model(inputs, L.Dense(3)(h))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_clipped_sum_matches_one_example_at_a_time(name, scale_rule):
    shape, _, has_rule = CATALOG[name]
    model = _model(name)
    if name in INTEGER_INPUTS:
        x = _ids(shape, INTEGER_INPUTS[name])
    else:
        x = RNG.normal(size=(B, *shape))
    check = keras_safe.testing.assert_dp_matches_reference(model, x, RNG.integers(0, 3, B))
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5
    # Some examples are clipped (the bound is the median norm): the bound is reached.
    assert check.max_sensitivity > 0.9
    if has_rule:
        assert check.fallback is None, "a layer with a rule went to the Jacobian fallback"
    else:
        assert check.fallback in ("vectorized", "loop")
