"""Convolutions: per-example kernel gradients as outer products of patches (im2col).

A convolution's kernel gradient is `sum_t p_t g_t^T` over output positions t, with `p_t` the
input patch under the kernel and `g_t` the output gradient: the outer-product form of a Dense on
a sequence of patches (`conv_kernel.py`: the patches, and the form of a Conv1D/Conv2D kernel,
which materialises every example's gradient with the examples as convolution groups). Grouped and
depthwise convolutions are one outer product per group; separable convolutions a depthwise one
followed by a pointwise (1x1) one. A transposed convolution is the adjoint of a convolution, so
its kernel gradient pairs the patches of the *output* gradient with the inputs.
"""

import math

import keras
import tensorflow as tf

from keras_safe.privacy.per_example.forms import OuterProductGrad
from keras_safe.privacy.per_example.numerics import (
    U64,
    gamma,
    norm_bound,
    working,
)
from keras_safe.privacy.per_example.rules.base import (
    PerExampleRule,
    finish,
    plain_keras_call,
    positions,
)
from keras_safe.privacy.per_example.rules.conv_kernel import ConvKernelGrad, patches
from keras_safe.privacy.per_example.rules.dense import bias_form

__all__ = [
    "ConvRule",
    "ConvTransposeRule",
    "ConvKernelGrad",
    "DepthwiseConvRule",
    "SeparableConvRule",
    "patches",
]


def _channels_last(layer):
    return layer.data_format == "channels_last"


def _plain_channels_last(layer, classes):
    """True for a channels-last layer of one of `classes` whose `call` is Keras's own."""
    return any(plain_keras_call(layer, cls) for cls in classes) and _channels_last(layer)


def _add_bias(layer, z):
    if layer.use_bias:
        z = z + layer.bias
    return z


def _output_grads(dz):
    return positions(dz, dz.shape[-1])


def _grouped(p, g, groups, taps):
    """Splits patches `[B, T, taps * C]` and gradients `[B, T, F]` into `groups` groups."""
    channels = p.shape[-1] // taps
    p = positions(p, taps, groups, channels // groups)
    p = keras.ops.transpose(p, (0, 1, 3, 2, 4))
    p = positions(p, groups, taps * (channels // groups))
    g = positions(g, groups, g.shape[-1] // groups)
    return p, g


class ConvRule(PerExampleRule):
    """`Conv1D`, `Conv2D`, `Conv3D` (channels last), grouped or not, any padding (causal too),
    strides and dilation."""

    @staticmethod
    def supports(layer):
        return _plain_channels_last(
            layer,
            (
                keras.layers.Conv1D,
                keras.layers.Conv2D,
                keras.layers.Conv3D,
            ),
        )

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        padding = layer.padding
        if padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            inputs = keras.ops.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        z = keras.ops.conv(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        z = _add_bias(layer, z)
        record(inputs, z)
        return finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        padding = "valid" if layer.padding == "causal" else layer.padding  # inputs are padded
        g = _output_grads(dz)
        bound = _patch_norm_bound(inputs, layer, layer.groups)
        a, g_rows = None, g
        if layer.groups > 1 or len(layer.kernel_size) == 3:
            a = patches(inputs, layer.kernel_size, layer.strides, padding, layer.dilation_rate)
        if layer.groups > 1:
            a, g_rows = _grouped(a, g, layer.groups, math.prod(layer.kernel_size))
        g_norm = norm_bound(g_rows, [1, 3] if layer.groups > 1 else [1, 2])
        kernel = layer.kernel
        if layer.groups == 1 and len(layer.kernel_size) < 3:
            geometry = (layer.kernel_size, layer.strides, padding, layer.dilation_rate)
            kernel_form = ConvKernelGrad(kernel, inputs, g, geometry, bound, g_norm)
        else:
            kernel_form = OuterProductGrad(kernel, a, g_rows, kernel.shape, bound, g_norm)
        forms = [kernel_form]
        if layer.use_bias:
            total = tf.sqrt(tf.reduce_sum(tf.square(g_norm), 1)) if layer.groups > 1 else g_norm
            forms.append(bias_form(layer.bias, g, total))
        return forms


class DepthwiseConvRule(PerExampleRule):
    """`DepthwiseConv1D`, `DepthwiseConv2D` (channels last): one group per input channel."""

    @staticmethod
    def supports(layer):
        return _plain_channels_last(
            layer,
            (
                keras.layers.DepthwiseConv1D,
                keras.layers.DepthwiseConv2D,
            ),
        )

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        z = keras.ops.depthwise_conv(
            inputs,
            layer.kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        z = _add_bias(layer, z)
        record(inputs, z)
        return finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        g = _output_grads(dz)
        forms = [_depthwise_form(layer, layer.kernel, inputs, g)]
        if layer.use_bias:
            forms.append(bias_form(layer.bias, g))
        return forms


def _depthwise_form(layer, kernel, inputs, g):
    p = patches(inputs, layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate)
    channels = inputs.shape[-1]
    a, g_groups = _grouped(p, g, channels, math.prod(layer.kernel_size))
    bound = _patch_norm_bound(inputs, layer, channels)
    return OuterProductGrad(kernel, a, g_groups, kernel.shape, bound)


class SeparableConvRule(PerExampleRule):
    """`SeparableConv1D`, `SeparableConv2D` (channels last): depthwise, then pointwise."""

    @staticmethod
    def supports(layer):
        return _plain_channels_last(
            layer,
            (
                keras.layers.SeparableConv1D,
                keras.layers.SeparableConv2D,
            ),
        )

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        depthwise = keras.ops.depthwise_conv(
            inputs,
            layer.depthwise_kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
        )
        z = keras.ops.conv(depthwise, layer.pointwise_kernel, strides=1, padding="valid")
        z = _add_bias(layer, z)
        # Two recorded outputs: the depthwise output's gradient gives the depthwise kernel's.
        record((inputs, depthwise), depthwise, z)
        return finish(layer, z)

    @staticmethod
    def forms(layer, saved, d_depthwise, dz):
        inputs, depthwise = saved
        g = _output_grads(dz)
        pointwise = layer.pointwise_kernel
        forms = [
            _depthwise_form(layer, layer.depthwise_kernel, inputs, _output_grads(d_depthwise)),
            OuterProductGrad(pointwise, _output_grads(depthwise), g, pointwise.shape),
        ]
        if layer.use_bias:
            forms.append(bias_form(layer.bias, g))
        return forms


class ConvTransposeRule(PerExampleRule):
    """`Conv1DTranspose`, `Conv2DTranspose`, `Conv3DTranspose` (channels last, no
    `output_padding`): the kernel gradient pairs patches of the output gradient with the
    inputs."""

    @staticmethod
    def supports(layer):
        return (
            _plain_channels_last(
                layer,
                (
                    keras.layers.Conv1DTranspose,
                    keras.layers.Conv2DTranspose,
                    keras.layers.Conv3DTranspose,
                ),
            )
            and layer.output_padding is None
        )

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        z = keras.ops.conv_transpose(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        z = _add_bias(layer, z)
        record(inputs, z)
        return finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        p = patches(dz, layer.kernel_size, layer.strides, layer.padding, layer.dilation_rate)
        x = _output_grads(inputs)
        bound = _patch_norm_bound(dz, layer, 1)
        forms = [OuterProductGrad(layer.kernel, p, x, layer.kernel.shape, bound)]
        if layer.use_bias:
            forms.append(bias_form(layer.bias, _output_grads(dz)))
        return forms


def _patch_norm_bound(inputs, layer, groups):
    """An upper bound of each example's `||patches||_F` (per group), from the input alone.

    An input element lies in at most `prod_d ceil(k_d gcd(s_d, r_d) / s_d)` patches (kernel
    size k, stride s, dilation r), so the patches' squared norm is at most that count times
    the input's. A pass over the input instead of over the (larger) patches.
    """
    strides = layer.strides if isinstance(layer.strides, (list, tuple)) else [layer.strides]
    rank = len(layer.kernel_size)
    strides = list(strides) * (rank if len(strides) == 1 else 1)
    dilation = layer.dilation_rate
    dilation = list(dilation) * (rank if len(dilation) == 1 else 1)
    cover = math.prod(
        -(-k * math.gcd(s, r) // s) for k, s, r in zip(layer.kernel_size, strides, dilation)
    )
    x = working(inputs)
    channels = x.shape[-1]
    per_channel = tf.square(norm_bound(x, list(range(1, len(x.shape) - 1))))
    grouped = tf.reduce_sum(tf.reshape(per_channel, [-1, groups, channels // groups]), axis=2)
    inflate = 1.0 + 2.0 * gamma(channels // groups, U64)
    bound = tf.sqrt(grouped * cover * inflate)
    return bound if groups > 1 else bound[:, 0]
