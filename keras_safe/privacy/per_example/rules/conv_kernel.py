"""Kernel gradients of convolutions: im2col patches, and every example's gradient at once.

`patches` builds the im2col matrix a convolution's kernel gradient is an outer product of.
`ConvKernelGrad` is the form of a `Conv1D`/`Conv2D` kernel: it builds the patches only when a
method needs them, and materialises every example's kernel gradient with one convolution whose
groups are the examples (Rochette et al. 2019, "Efficient Per-Example Gradient Computations in
Convolutional Neural Networks") where that is cheaper.
"""

import math

import keras
import tensorflow as tf

from keras_safe.privacy.per_example.forms import OuterProductGrad
from keras_safe.privacy.per_example.numerics import (
    gamma,
    scaled_rows,
    static_size,
    sum_sq64,
    unit_roundoff,
    working,
)
from keras_safe.privacy.per_example.rules.base import positions

__all__ = ["ConvKernelGrad", "patches"]


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


class ConvKernelGrad(OuterProductGrad):
    """The per-example kernel gradients of a `Conv1D`/`Conv2D` without groups.

    An `OuterProductGrad` of the patches and the output gradients whose patches are built only
    when a method needs them (the Gram norm, microbatches, joins). Materialised gradients come
    from one convolution with the examples as groups where that is cheaper than im2col (at
    least `GROUPED_MIN_POSITIONS` output positions per input channel; measured on CPU: 2-2.6x
    faster from 8 positions per channel, slower below 2), where the kernels compute grouped
    filter gradients (`kernel_support`). The sums are the same dot products
    of T terms as the patches' (any summation order), so the rounding bound `gamma_T S_i` of the
    materialised form holds as it is.

    Where the materialised gradients would outgrow the layer's activations (kernel size K O above
    T (C + O): deep layers with many channels on small maps), they serve the norms only: they are
    computed a block of examples at a time (`BLOCK_VALUES` gradient entries per block, at least
    one example), squared, summed and dropped, so they never exist for the whole batch; the
    clipped sum is then the plain kernel gradient of the output gradients scaled by the factors
    (what a plain step computes), so memory stays near plain training's. Blocks are also faster
    there: measured on CPU for WideResNet-16-4's 8x8x256 layer at batch 256, 165-235 ms against
    470-500 ms for one convolution with 256 groups (the plain kernel gradient: 61 ms).

    Args:
        kernel: the kernel variable.
        inputs: the layer's (padded, for causal) inputs `[B, *spatial, C]`.
        g: output gradients `[B, T, O]`.
        geometry: `(kernel_size, strides, padding, dilation_rate)` of the convolution.
        a_norm_bound, g_norm_bound: as for `OuterProductGrad` (`a_norm_bound` required).
    """

    GROUPED_MIN_POSITIONS = 4
    BLOCK_VALUES = 2**22

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

    def _kernel_rows(self, inputs, g, patches_of):
        """`[B, K, O]`: the kernel gradient of every example of `inputs` and `g` (the layer's, or
        a block of its examples): one convolution with the examples as groups where the layer
        has many output positions per input channel, else the outer products of the patches
        (`patches_of()`)."""
        t, channels = self.g.shape[1], self.inputs.shape[-1]
        dilated = any(d > 1 for d in self.geometry[3])
        supported = kernel_support("groups") and (not dilated or kernel_support("dilations"))
        if t is not None and t >= self.GROUPED_MIN_POSITIONS * channels and supported:
            return _examples_as_groups(inputs, g, *self.geometry)
        return tf.einsum("btk,bto->bko", patches_of(), g)

    def _materialised(self):
        if self._rows is None:
            self._rows = self._kernel_rows(self.inputs, self.g, lambda: self.a)
        return self._rows

    def _sums_from_outputs(self):
        """True when the clipped sum is recomputed instead of summing materialised rows."""
        t, k, o, _ = self._dims()
        return self._method() == "outer" and k * o > t * (self.inputs.shape[-1] + o)

    def _blocked_sum_sq(self):
        """Every example's `sum_sq64` of its kernel gradient, computed in blocks of examples
        (`BLOCK_VALUES`), so the whole batch's gradients are never held at once."""
        _, k, o, _ = self._dims()
        per_block = max(1, self.BLOCK_VALUES // (k * o))
        batch = tf.shape(self.g)[0]
        blocks = tf.maximum((batch + per_block - 1) // per_block, 1)
        size = (batch + blocks - 1) // blocks
        pad = blocks * size - batch

        def split(x):
            x = tf.pad(x, [[0, pad]] + [[0, 0]] * (len(x.shape) - 1))
            return tf.reshape(x, tf.concat([[blocks, size], tf.shape(x)[1:]], 0))

        def norms(pair):
            inputs, g = pair
            rows = self._kernel_rows(inputs, g, lambda: working(patches(inputs, *self.geometry)))
            return sum_sq64(rows)

        out = tf.map_fn(
            norms,
            (split(self.inputs), split(self.g)),
            fn_output_signature=tf.TensorSpec([None], tf.float64),
            parallel_iterations=2,
        )
        return tf.reshape(out, [-1])[:batch]

    def norm_bounds(self):
        if not self._sums_from_outputs():
            return super().norm_bounds()
        u_mm = unit_roundoff(self.g.dtype, matmul=True)
        position_bound = self._position_norms_bound()
        # As the materialised form: the float sum over positions errs by at most gamma_T S_i.
        computed = tf.sqrt(self._blocked_sum_sq())
        norms_sq = tf.square(computed + gamma(self._steps(), u_mm) * position_bound)
        # The clipped sum: the factor's rounding, then T products summed per entry.
        return norms_sq, gamma(self._steps() + 1, u_mm) * position_bound

    def clipped_sum(self, factors):
        if not self._sums_from_outputs():
            return super().clipped_sum(factors)
        inputs = scaled_rows(self.inputs, None, factors)
        g = scaled_rows(self.g, factors, factors)
        x, dz, geometry = _as_2d(inputs, g, self.geometry)
        grad = _filter_gradient(x, dz, [*geometry[0], x.shape[-1], dz.shape[-1]], *geometry[1:])
        return tf.reshape(grad, self.shape)


def _as_2d(inputs, g, geometry):
    """`(inputs, output gradients, geometry)` of the convolution as a Conv2D: a Conv1D has
    height 1; the output gradients `[B, T, O]` are shaped `[B, *spatial_out, O]`."""
    kernel_size, strides, padding, dilation_rate = geometry
    if len(kernel_size) == 1:
        inputs = inputs[:, None]
        kernel_size, strides, dilation_rate = (
            (1, *kernel_size),
            (1, *strides),
            (1, *dilation_rate),
        )
    spatial = tf.shape(inputs)[1:3]
    out_spatial = _output_size(spatial, kernel_size, strides, padding, dilation_rate)
    dz = tf.reshape(g, tf.concat([[-1], out_spatial, [g.shape[-1]]], 0))
    return inputs, dz, (kernel_size, strides, padding, dilation_rate)


_SUPPORT = {}


def kernel_support(feature):
    """Whether this process's `Conv2DBackpropFilter` kernel computes the filter gradient of a
    grouped convolution (`"groups"`: fewer filter than input channels) or of a dilated one
    (`"dilations"`).

    oneDNN's CPU kernels (TensorFlow's default on x86 Linux and Windows) do both; TensorFlow's
    own (Eigen) CPU kernel, used where oneDNN is off (`TF_ENABLE_ONEDNN_OPTS=0`, some ARM
    builds), refuses both. Probed once per feature, eagerly, on the device ops run on by default.
    """
    if feature not in _SUPPORT:
        groups, dilations = (2, 1) if feature == "groups" else (1, 2)
        with tf.init_scope():
            try:
                tf.raw_ops.Conv2DBackpropFilter(
                    input=tf.ones([1, 3, 3, groups]),
                    filter_sizes=[2, 2, 1, groups],
                    out_backprop=tf.ones([1, 3 - dilations, 3 - dilations, groups]),
                    strides=[1, 1, 1, 1],
                    padding="VALID",
                    dilations=[1, dilations, dilations, 1],
                )
                _SUPPORT[feature] = True
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
                _SUPPORT[feature] = False
    return _SUPPORT[feature]


def _filter_gradient(x, dz, filter_sizes, strides, padding, dilation_rate):
    """The kernel gradient of a 2D convolution of `x` whose output gradient is `dz`: the raw
    kernel, or, for a dilated convolution where it refuses dilations, the gradient of
    `tf.nn.convolution` (which runs a dilated convolution as an undilated one on rearranged
    blocks)."""
    if any(d > 1 for d in dilation_rate) and not kernel_support("dilations"):
        kernel = tf.zeros(filter_sizes, x.dtype)
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            out = tf.nn.convolution(x, kernel, strides, padding.upper(), dilations=dilation_rate)
        return tape.gradient(out, kernel, output_gradients=dz)
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x,
        filter_sizes=filter_sizes,
        out_backprop=dz,
        strides=[1, *strides, 1],
        padding=padding.upper(),
        dilations=[1, *dilation_rate, 1],
    )


def _examples_as_groups(inputs, g, *geometry):
    """`[B, prod(kernel_size) * C, O]`: every example's kernel gradient, one convolution.

    The batch is folded into the channels (`[1, *spatial, B * C]`, output gradient
    `[1, *spatial_out, B * O]`): the kernel gradient of a convolution with B groups is then
    every example's kernel gradient side by side.
    """
    inputs, dz, (kernel_size, strides, padding, dilation_rate) = _as_2d(inputs, g, geometry)
    channels, out_channels = inputs.shape[-1], g.shape[-1]
    spatial, out_spatial = tf.shape(inputs)[1:3], tf.shape(dz)[1:3]
    folded = tf.reshape(tf.transpose(inputs, [1, 2, 0, 3]), tf.concat([[1], spatial, [-1]], 0))
    dz = tf.reshape(tf.transpose(dz, [1, 2, 0, 3]), tf.concat([[1], out_spatial, [-1]], 0))
    filter_sizes = tf.stack([*kernel_size, channels, tf.shape(dz)[-1]])
    kernel = _filter_gradient(folded, dz, filter_sizes, strides, padding, dilation_rate)
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
