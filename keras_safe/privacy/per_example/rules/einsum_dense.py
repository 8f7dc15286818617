"""EinsumDense: per-example kernel gradients as a Dense layer's outer products where the
equation is a Dense layer's in disguise, else materialised by one einsum."""

import math

import keras
import tensorflow as tf

from keras_safe.privacy.per_example.forms import MaterialisedGrad, summed_form
from keras_safe.privacy.per_example.numerics import gamma, unit_roundoff, working
from keras_safe.privacy.per_example.rules.base import (
    PerExampleRule,
    finish,
    plain_keras_call,
    positions,
)
from keras_safe.privacy.per_example.rules.dense import outer_product_forms

__all__ = ["EinsumDenseRule", "einsum_bias_form"]


def _parts(layer):
    lhs, out = layer.equation.replace(" ", "").split("->")
    ins, ker = lhs.split(",")
    return ins, ker, out


class EinsumDenseRule(PerExampleRule):
    """`keras.layers.EinsumDense` whose equation has the batch letter first in the input and
    output and not in the kernel (no ellipsis)."""

    @staticmethod
    def supports(layer):
        if not plain_keras_call(layer, keras.layers.EinsumDense):
            return False
        ins, ker, out = _parts(layer)
        # Per-example gradients need the batch letter in the input and output, not in the kernel.
        return "." not in layer.equation and ins[0] == out[0] and ins[0] not in ker

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        z = keras.ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            z = z + layer.bias
        record(inputs, z)
        return finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        ins, ker, out = _parts(layer)
        inputs, dz = working(inputs), working(dz)
        split = _dense_split(ins, ker, out, inputs, dz)
        if split is not None:
            # `b P C, C O -> b P O`: per example, the sum over the positions P of the outer
            # products of the inputs (C flattened) and the output gradients (O flattened), the
            # Dense layer's form (no pass of |inputs| x |dz| for the rounding bound).
            k, o = split
            a, g = positions(inputs, math.prod(k)), positions(dz, math.prod(o))
            whole = layer.bias is None or tuple(layer.bias.shape) == o  # a bias over all of O
            forms = outer_product_forms(layer.kernel, layer.bias if whole else None, a, g)
            return forms if whole else forms + [einsum_bias_form(layer, dz)]
        batch = ins[0]
        equation = f"{ins},{out}->{batch}{ker}"
        kernel_grads = keras.ops.einsum(equation, inputs, dz)
        # Letters summed inside each example: the einsum's float sum carries a rounding bound.
        summed = sorted(set(ins + out) - set(ker) - {batch})
        sizes = [_size(c, ins, inputs, out, dz) for c in summed]
        error = None
        if any(not isinstance(size, int) or size > 1 for size in sizes):
            count = tf.reduce_prod(tf.stack([tf.cast(size, "int32") for size in sizes]))
            magnitude = keras.ops.einsum(equation, keras.ops.abs(inputs), keras.ops.abs(dz))
            flat = tf.reshape(magnitude, [tf.shape(magnitude)[0], -1])
            size = tf.norm(tf.cast(flat, "float64"), axis=1)
            error = gamma(count, unit_roundoff(dz.dtype, matmul=True)) * size * (1.0 + 1e-6)
        forms = [MaterialisedGrad(layer.kernel, kernel_grads, error)]
        if layer.bias is not None:
            forms.append(einsum_bias_form(layer, dz))
        return forms


def _dense_split(ins, ker, out, inputs, dz):
    """The static sizes `(C, O)` when the equation is `bPC,CO->bPO` (batch letter b, position
    letters P, contracted letters C, output letters O, each group in that order, C and O not
    empty) and those sizes are known while tracing, else None."""
    batch, rest = ins[0], ins[1:]
    shared = "".join(c for c in rest if c in out)
    contracted = rest[len(shared) :]
    kept = out[1 + len(shared) :]
    if (
        not contracted
        or not kept
        or ins != batch + shared + contracted
        or out != batch + shared + kept
        or ker != contracted + kept
    ):
        return None
    k = tuple(inputs.shape[len(ins) - len(contracted) :])
    o = tuple(dz.shape[len(out) - len(kept) :])
    return None if None in k or None in o else (k, o)


def _size(letter, ins, inputs, out, dz):
    tensor, spec = (inputs, ins) if letter in ins else (dz, out)
    axis = spec.index(letter)
    size = tensor.shape[axis]
    return tf.shape(tensor)[axis] if size is None else size


def einsum_bias_form(layer, dz):
    """The bias spans the trailing output axes from the first bias axis on, with size 1 on the
    axes of that span that are not bias axes: sum `dz` over everything else."""
    bias_shape = list(layer.bias.shape)
    lead = len(dz.shape) - len(bias_shape)
    axes = list(range(1, lead))
    for axis, size in enumerate(bias_shape, start=lead):
        if size == 1 and dz.shape[axis] != 1:
            axes.append(axis)
    return summed_form(layer.bias, dz, axes)
