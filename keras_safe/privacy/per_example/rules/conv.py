"""Convolutions: per-example kernel gradients as outer products of patches (im2col).

A convolution's kernel gradient is `sum_t p_t g_t^T` over output positions t, with `p_t` the
input patch under the kernel and `g_t` the output gradient: the outer-product form of a Dense on
a sequence of patches. Where every example's gradient is materialised and the output has many
positions per input channel, one convolution with the batch folded into the channels (the
examples as groups, Rochette et al. 2019, "Efficient Per-Example Gradient Computations in
Convolutional Neural Networks") computes the same sums without building the patches. Grouped and
depthwise convolutions are one outer product per group; separable convolutions a depthwise one
followed by a pointwise (1x1) one. A transposed convolution is the adjoint of a convolution, so
its kernel gradient pairs the patches of the *output* gradient with the inputs.
"""

import math

import keras
import tensorflow as tf

from keras_safe.privacy.per_example.forms import OuterProductGrad
from keras_safe.privacy.per_example.numerics import (
    frobenius_bound,
    gamma,
    static_size,
    unit_roundoff,
    working,
)
from keras_safe.privacy.per_example.rules.base import (
    TapRule,
    finish,
    plain_keras_call,
    positions,
)
from keras_safe.privacy.per_example.rules.dense import bias_form

__all__ = [
    "ConvRule",
    "ConvTransposeRule",
    "ConvKernelGrad",
    "DepthwiseConvRule",
    "SeparableConvRule",
    "patches",
]


def patches(inputs, kernel_size, strides, padding, dilation_rate):
    """im2col: `[B, positions, prod(kernel_size) * channels]`, (spatial, channel) order.

    With few input channels, `extract_patches` copies tiny chunks and is slow on CPU; there a
    convolution with a one-hot kernel (output channel m reads kernel tap m) builds the same
    patches through the optimised convolution path. Three-dimensional inputs with many
    channels use `extract_volume_patches`, or, with dilation, a one-hot convolution per channel.
    """
    rank = len(kernel_size)
    channels = inputs.shape[-1]
    taps = math.prod(kernel_size)
    if channels < 8:
        size = taps * channels
        one_hot = keras.ops.reshape(
            keras.ops.eye(size, dtype=inputs.dtype), (*kernel_size, channels, size)
        )
        out = keras.ops.conv(
            inputs, one_hot, strides=list(strides), padding=padding, dilation_rate=dilation_rate
        )
        return positions(out, size)
    if rank < 3:
        images = inputs[:, None] if rank == 1 else inputs
        one = [1] * (2 - rank)
        out = tf.image.extract_patches(
            images,
            [1, *one, *kernel_size, 1],
            [1, *one, *strides, 1],
            [1, *one, *dilation_rate, 1],
            padding.upper(),
        )
    elif all(d == 1 for d in dilation_rate):
        out = tf.extract_volume_patches(
            inputs, [1, *kernel_size, 1], [1, *strides, 1], padding.upper()
        )
    else:
        return _patches_per_channel(inputs, kernel_size, strides, padding, dilation_rate)
    return positions(out, out.shape[-1])


def _patches_per_channel(inputs, kernel_size, strides, padding, dilation_rate):
    rank = len(kernel_size)
    taps = math.prod(kernel_size)
    channels = inputs.shape[-1]
    moved = tf.transpose(inputs, [0, rank + 1, *range(1, rank + 1)])
    single = tf.reshape(moved, tf.concat([[-1], tf.shape(inputs)[1:-1], [1]], axis=0))
    one_hot = tf.reshape(tf.eye(taps, dtype=inputs.dtype), [*kernel_size, 1, taps])
    out = keras.ops.conv(
        single, one_hot, strides=list(strides), padding=padding, dilation_rate=dilation_rate
    )
    out = tf.reshape(out, [-1, channels, tf.reduce_prod(tf.shape(out)[1:-1]), taps])
    out = tf.transpose(out, [0, 2, 3, 1])  # [B, T, taps, channels]
    return positions(out, taps * channels)


def _channels_last(layer):
    return layer.data_format == "channels_last"


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


class ConvRule(TapRule):
    """`Conv1D`, `Conv2D`, `Conv3D` (channels last), grouped or not, any padding (causal too),
    strides and dilation."""

    @staticmethod
    def supports(layer):
        for cls in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D):
            if plain_keras_call(layer, cls):
                return _channels_last(layer)
        return False

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
        g_norm = frobenius_bound(g_rows, [1, 3] if layer.groups > 1 else [1, 2])
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


class DepthwiseConvRule(TapRule):
    """`DepthwiseConv1D`, `DepthwiseConv2D` (channels last): one group per input channel."""

    @staticmethod
    def supports(layer):
        for cls in (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D):
            if plain_keras_call(layer, cls):
                return _channels_last(layer)
        return False

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


class SeparableConvRule(TapRule):
    """`SeparableConv1D`, `SeparableConv2D` (channels last): depthwise, then pointwise."""

    @staticmethod
    def supports(layer):
        for cls in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D):
            if plain_keras_call(layer, cls):
                return _channels_last(layer)
        return False

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


class ConvTransposeRule(TapRule):
    """`Conv1DTranspose`, `Conv2DTranspose`, `Conv3DTranspose` (channels last, no
    `output_padding`): the kernel gradient pairs patches of the output gradient with the
    inputs."""

    @staticmethod
    def supports(layer):
        for cls in (
            keras.layers.Conv1DTranspose,
            keras.layers.Conv2DTranspose,
            keras.layers.Conv3DTranspose,
        ):
            if plain_keras_call(layer, cls):
                return _channels_last(layer) and layer.output_padding is None
        return False

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
    per_channel = tf.reduce_sum(tf.square(x), axis=list(range(1, len(x.shape) - 1)))
    grouped = tf.reduce_sum(tf.reshape(per_channel, [-1, groups, channels // groups]), axis=2)
    if None in x.shape[1:-1]:
        count = tf.reduce_prod(tf.shape(x)[1:-1]) * (channels // groups)
    else:
        count = math.prod(x.shape[1:-1]) * (channels // groups)
    inflate = 1.0 + 2.0 * gamma(count, unit_roundoff(x.dtype))
    bound = tf.sqrt(tf.cast(grouped, "float64") * cover * inflate)
    return bound if groups > 1 else bound[:, 0]


class ConvKernelGrad(OuterProductGrad):
    """The per-example kernel gradients of a `Conv1D`/`Conv2D` without groups.

    An `OuterProductGrad` of the patches and the output gradients whose patches are built only
    when a method needs them (the Gram norm, microbatches, joins). Materialised gradients come
    from one convolution with the examples as groups where that is cheaper than im2col (at
    least `GROUPED_MIN_POSITIONS` output positions per input channel; measured on CPU: 2-2.6x
    faster from 8 positions per channel, slower below 2). The sums are the same dot products
    of T terms as the patches' (any summation order), so the rounding bound `gamma_T S_i` of the
    materialised form holds as it is.

    Args:
        kernel: the kernel variable.
        inputs: the layer's (padded, for causal) inputs `[B, *spatial, C]`.
        g: output gradients `[B, T, O]`.
        geometry: `(kernel_size, strides, padding, dilation_rate)` of the convolution.
        a_norm_bound, g_norm_bound: as for `OuterProductGrad` (`a_norm_bound` required).
    """

    GROUPED_MIN_POSITIONS = 4

    def __init__(self, kernel, inputs, g, geometry, a_norm_bound, g_norm_bound=None):
        self.variable = kernel
        self.inputs = working(inputs)
        self.g = working(g)
        self.geometry = geometry
        self.shape = tuple(kernel.shape)
        self.grouped = False
        self.a_norm_bound = a_norm_bound
        self.g_norm_bound = g_norm_bound
        self._rows = None
        self._patches = None

    @property
    def a(self):
        if self._patches is None:
            self._patches = working(patches(self.inputs, *self.geometry))
        return self._patches

    def _dims(self):
        kernel_size = self.geometry[0]
        k = math.prod(kernel_size) * self.inputs.shape[-1]
        return self.g.shape[1], k, self.g.shape[-1], 1

    def _steps(self):
        return static_size(self.g, 1)

    def _materialised(self):
        if self._rows is None:
            t, channels = self.g.shape[1], self.inputs.shape[-1]
            if t is not None and t >= self.GROUPED_MIN_POSITIONS * channels:
                self._rows = _examples_as_groups(self.inputs, self.g, *self.geometry)
            else:
                self._rows = super()._materialised()
        return self._rows


def _examples_as_groups(inputs, g, kernel_size, strides, padding, dilation_rate):
    """`[B, prod(kernel_size) * C, O]`: every example's kernel gradient, one convolution.

    The batch is folded into the channels (`[1, *spatial, B * C]`, output gradient
    `[1, *spatial_out, B * O]`): the kernel gradient of a convolution with B groups is then
    every example's kernel gradient side by side.
    """
    if len(kernel_size) == 1:  # Conv1D as a Conv2D of height 1
        inputs = inputs[:, None]
        kernel_size, strides, dilation_rate = (
            (1, *kernel_size),
            (1, *strides),
            (1, *dilation_rate),
        )
    channels, out_channels = inputs.shape[-1], g.shape[-1]
    spatial = tf.shape(inputs)[1:3]
    out_spatial = _output_size(spatial, kernel_size, strides, padding, dilation_rate)
    folded = tf.reshape(tf.transpose(inputs, [1, 2, 0, 3]), tf.concat([[1], spatial, [-1]], 0))
    dz = tf.reshape(g, tf.concat([[-1], out_spatial, [out_channels]], 0))
    dz = tf.reshape(tf.transpose(dz, [1, 2, 0, 3]), tf.concat([[1], out_spatial, [-1]], 0))
    kernel = tf.raw_ops.Conv2DBackpropFilter(
        input=folded,
        filter_sizes=tf.stack([*kernel_size, channels, tf.shape(dz)[-1]]),
        out_backprop=dz,
        strides=[1, *strides, 1],
        padding=padding.upper(),
        dilations=[1, *dilation_rate, 1],
    )
    kernel = tf.reshape(kernel, [math.prod(kernel_size) * channels, -1, out_channels])
    return tf.transpose(kernel, [1, 0, 2])


def _output_size(spatial, kernel_size, strides, padding, dilation_rate):
    """Output spatial size of a convolution (`padding` "same" or "valid")."""
    sizes = []
    for d, (k, s, r) in enumerate(zip(kernel_size, strides, dilation_rate)):
        n = spatial[d]
        if padding == "valid":
            n = n - (k - 1) * r
        sizes.append((n + s - 1) // s)
    return tf.stack(sizes)
