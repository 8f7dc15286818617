"""LoRA-enabled Dense, EinsumDense and Embedding (`layer.enable_lora(rank)`, Hu et al. 2022).

Keras computes such a layer with the kernel `W + s A B`: `s = lora_alpha / rank`, `A` has the
kernel's leading axes and r columns, `B` is `[r, L]` with L the kernel's last axis. For the
layers whose per-example kernel gradient is an outer product summed over positions,
`dK_i = sum_t f_t e_t^T` (f_t: the factor holding the kernel's leading axes, e_t: the one
holding its trailing axes, one of them the layer's input and the other the gradient at its
pre-activation), the adapters' gradients are outer products of r-wide factors:

- `dA_i = s dK_i B^T = sum_t f_t (s e_t B^T)^T`,
- `dB_i = s A^T dK_i = sum_t (s A^T f_t) e_t^T`,

and an embedding's adapters get the same with the looked-up rows: rows `ids_t` of `dA_i`
receive `s g_t B^T`, and `dB_i = sum_t (s A[ids_t]) g_t^T`. So DP fine-tuning with adapters
(Yu et al. 2022, "Differentially Private Fine-tuning of Language Models") takes each example's
norm and the clipped sum from these factors: no Jacobian, no per-example kernel.

The projected factors are float products, so their forms carry the rounding bound of the
projection (`FactorRounding`): with `u` the unit roundoff, `n` the length of the projection's
dot products and `S_i = sum_t |f_t| |e_t|`, the computed gradient is within
`gamma_{n+1} |s| ||B||_F S_i` (or `||A||_F`) of the exact one.
"""

import math

import keras
import tensorflow as tf

from keras_safe.privacy.per_example.embedding_form import EmbeddingGrad
from keras_safe.privacy.per_example.forms import GradientForm, OuterProductGrad
from keras_safe.privacy.per_example.numerics import (
    U64,
    f64,
    gamma,
    leading,
    unit_roundoff,
    working,
)
from keras_safe.privacy.per_example.rules.base import PerExampleRule, as_sequence, positions
from keras_safe.privacy.per_example.rules.dense import DenseRule, bias_form
from keras_safe.privacy.per_example.rules.einsum_dense import EinsumDenseRule, einsum_bias_form
from keras_safe.privacy.per_example.rules.embedding import EmbeddingRule

__all__ = [
    "FactorRounding",
    "LoRADenseRule",
    "LoRAEinsumDenseRule",
    "LoRAEmbeddingRule",
]


class FactorRounding(GradientForm):
    """A form whose factors were computed in float: `form`'s gradients are within `error`
    (float64 `[B]`) of the exact ones, so its norm bounds grow by `error`.

    Args:
        form: the form of the computed factors.
        error: float64 `[B]`: a bound on the norm of each example's gradient error.
    """

    def __init__(self, form, error):
        self.form = form
        self.error = error
        self.variable = form.variable

    def norm_bounds(self):
        norms_sq, slack = self.form.norm_bounds()
        return tf.square(tf.sqrt(norms_sq) + self.error), slack

    def clipped_sum(self, factors):
        return self.form.clipped_sum(factors)

    def group(self, groups):
        error = tf.reduce_sum(tf.reshape(self.error, leading(groups)), axis=1)
        return FactorRounding(self.form.group(groups), error)

    def materialise(self):
        rows, error = self.form.materialise()
        return rows, self.error if error is None else error + self.error

    @classmethod
    def concat(cls, forms):
        inner = [f.form for f in forms]
        kind = type(inner[0])
        if any(type(f) is not kind for f in inner):
            return None
        joined = kind.concat(inner)
        if joined is None:
            return None
        return FactorRounding(joined, tf.add_n([f.error for f in forms]))


def _named(layer, name):
    """The layer's one weight called `name` (the variable behind a LoRA layer's kernel)."""
    found = [w for w in layer.weights if w.name == name]
    return found[0] if len(found) == 1 else None


def _stock_lora(layer, cls, kernel, adapters):
    """True when `layer` runs `cls`'s own call and kernel property with LoRA on, unquantized."""
    return (
        isinstance(layer, cls)
        and type(layer).call is cls.call
        and getattr(type(layer), kernel, None) is getattr(cls, kernel)
        and getattr(layer, "lora_enabled", False) is True
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "_remat_mode", None)  # keras-internal: remat-mode
        and _named(layer, kernel) is not None
        and all(getattr(layer, a, None) is not None for a in adapters)
    )


def _scale(layer):
    return layer.lora_alpha / layer.lora_rank


def _frobenius64(variable):
    """A float64 upper bound of a (small) variable's Frobenius norm."""
    values = f64(keras.ops.convert_to_tensor(variable))
    n = math.prod(variable.shape)
    return tf.sqrt(tf.reduce_sum(tf.square(values))) * (1.0 + (n + 4) * U64)


def _reach(first, second):
    """float64 `[B]` upper bound of `S_i = sum_t |f_t| |e_t|` (`first`: `[B, T, F]`,
    `second`: `[B, T, ...]`)."""
    u = unit_roundoff(first.dtype)
    f_size = first.shape[-1]
    s_axes = list(range(2, len(second.shape)))
    s_size = math.prod(second.shape[2:])
    f_sq = f64(tf.reduce_sum(tf.square(first), axis=-1)) * (1.0 + 2.0 * gamma(f_size, u))
    s_sq = f64(tf.reduce_sum(tf.square(second), axis=s_axes)) * (1.0 + 2.0 * gamma(s_size, u))
    return tf.reduce_sum(tf.sqrt(f_sq * s_sq), axis=1) * (1.0 + 1e-9)


def _trainable(variable):
    return variable is not None and variable.trainable


def low_rank_forms(kernel, lora_a, lora_b, scale, first, second):
    """The forms of a kernel `W + scale * A B` whose per-example gradient is
    `sum_t f_t e_t^T`.

    Args:
        kernel: the base kernel variable (its form only when it is trainable).
        lora_a: `A`, shaped like the kernel with its last axis replaced by r.
        lora_b: `B`, `[r, L]`.
        scale: `lora_alpha / rank`.
        first: `[B, T, F]`: the factor of the kernel's leading axes (F: their size).
        second: `[B, T, S, L]`: the factor of its trailing axes (S: the size of those before
            the last one, 1 for a Dense).
    """
    first, second = working(first), working(second)
    dtype = first.dtype
    f, s, last = first.shape[-1], second.shape[2], second.shape[3]
    rank = lora_b.shape[0]
    u = unit_roundoff(dtype, matmul=True)
    forms = []
    if _trainable(kernel):
        forms.append(OuterProductGrad(kernel, first, positions(second, s * last), kernel.shape))
    if not (_trainable(lora_a) or _trainable(lora_b)):
        return forms
    reach = _reach(first, second)
    if _trainable(lora_a):
        b = tf.cast(keras.ops.convert_to_tensor(lora_b), dtype)
        projected = tf.einsum("btsl,rl->btsr", second, b) * scale
        error = gamma(last + 1, u) * abs(scale) * _frobenius64(lora_b) * reach
        form = OuterProductGrad(lora_a, first, positions(projected, s * rank), lora_a.shape)
        forms.append(FactorRounding(form, error))
    if _trainable(lora_b):
        a = tf.reshape(tf.cast(keras.ops.convert_to_tensor(lora_a), dtype), [f, s, rank])
        projected = tf.einsum("btf,fsr->btsr", first, a) * scale
        error = gamma(f + 1, u) * abs(scale) * _frobenius64(lora_a) * reach
        form = OuterProductGrad(
            lora_b, positions(projected, rank), positions(second, last), lora_b.shape
        )
        forms.append(FactorRounding(form, error))
    return forms


class LoRADenseRule(PerExampleRule):
    """`keras.layers.Dense` with LoRA enabled, frozen base kernel or not."""

    @staticmethod
    def supports(layer):
        return _stock_lora(layer, keras.layers.Dense, "kernel", ("lora_kernel_a", "lora_kernel_b"))

    forward = staticmethod(DenseRule.forward)  # the base layer's call, recorded

    @staticmethod
    def forms(layer, inputs, dz):
        g = as_sequence(dz)
        forms = low_rank_forms(
            _named(layer, "kernel"),
            layer.lora_kernel_a,
            layer.lora_kernel_b,
            _scale(layer),
            as_sequence(inputs),
            g[:, :, None, :],
        )
        if _trainable(layer.bias):
            forms.append(bias_form(layer.bias, g))
        return forms


def _parts(equation):
    lhs, out = equation.replace(" ", "").split("->")
    ins, ker = lhs.split(",")
    return ins, ker, out


def einsum_layout(equation):
    """How an EinsumDense equation maps onto `sum_t f_t e_t^T`, or None when it does not.

    Supported: the batch letter first in the input and output and not in the kernel; every
    other letter either a position (input and output, not kernel) or a kernel letter in
    exactly one of input and output; the kernel's letters from the input and from the output
    in two blocks, both non-empty (as in every MultiHeadAttention projection).

    Returns:
        `(x_perm, dz_perm, x_first, lead)`: the permutations that bring the input and the
        output gradient to `[batch, positions..., kernel letters in kernel order]`, whether the
        input's letters lead the kernel, and the number of leading kernel axes.
    """
    if "." in equation:
        return None
    ins, ker, out = _parts(equation)
    if any(len(set(p)) != len(p) for p in (ins, ker, out)) or ins[0] != out[0] or ins[0] in ker:
        return None
    places = [c for c in ins[1:] if c not in ker]
    from_x = [c for c in ker if c in ins]
    from_dz = [c for c in ker if c in out]
    if (
        set(from_x) & set(from_dz)
        or set(from_x) | set(from_dz) != set(ker)
        or any(c not in out for c in places)
        or set(out[1:]) != set(places) | set(from_dz)
        or not from_x
        or not from_dz
    ):
        return None
    if list(ker) == from_x + from_dz:
        x_first = True
    elif list(ker) == from_dz + from_x:
        x_first = False
    else:
        return None
    x_perm = [0] + [ins.index(c) for c in places + from_x]
    dz_perm = [0] + [out.index(c) for c in places + from_dz]
    return x_perm, dz_perm, x_first, len(from_x if x_first else from_dz)


def _transposed(t, perm):
    return t if perm == sorted(perm) else tf.transpose(t, perm)


class LoRAEinsumDenseRule(PerExampleRule):
    """`keras.layers.EinsumDense` with LoRA enabled (so MultiHeadAttention projections),
    for the equations `einsum_layout` maps onto an outer product."""

    @staticmethod
    def supports(layer):
        return (
            _stock_lora(
                layer, keras.layers.EinsumDense, "kernel", ("lora_kernel_a", "lora_kernel_b")
            )
            and einsum_layout(layer.equation) is not None
        )

    forward = staticmethod(EinsumDenseRule.forward)

    @staticmethod
    def forms(layer, inputs, dz):
        x_perm, dz_perm, x_first, lead = einsum_layout(layer.equation)
        kernel = _named(layer, "kernel")
        shape = tuple(kernel.shape)
        x, g = _transposed(working(inputs), x_perm), _transposed(working(dz), dz_perm)
        first, second = (x, g) if x_first else (g, x)
        head, tail = math.prod(shape[:lead]), math.prod(shape[lead:-1])
        forms = low_rank_forms(
            kernel,
            layer.lora_kernel_a,
            layer.lora_kernel_b,
            _scale(layer),
            positions(first, head),
            positions(second, tail, shape[-1]),
        )
        if _trainable(layer.bias):
            forms.append(einsum_bias_form(layer, working(dz)))
        return forms


class LoRAEmbeddingRule(PerExampleRule):
    """`keras.layers.Embedding` with LoRA enabled, frozen table or not."""

    @staticmethod
    def supports(layer):
        return _stock_lora(
            layer,
            keras.layers.Embedding,
            "embeddings",
            ("lora_embeddings_a", "lora_embeddings_b"),
        )

    forward = staticmethod(EmbeddingRule.forward)

    @staticmethod
    def forms(layer, ids, dz):
        flat_ids = positions(ids)
        g = working(positions(dz, dz.shape[-1]))
        table, lora_a, lora_b = (
            _named(layer, "embeddings"),
            layer.lora_embeddings_a,
            layer.lora_embeddings_b,
        )
        scale = _scale(layer)
        u = unit_roundoff(g.dtype, matmul=True)
        forms = []
        if _trainable(table):
            forms.append(EmbeddingGrad(table, flat_ids, g))
        if not (_trainable(lora_a) or _trainable(lora_b)):
            return forms
        lengths = tf.sqrt(f64(tf.reduce_sum(tf.square(g), axis=-1)))
        reach = tf.reduce_sum(lengths, axis=1) * (1.0 + 2.0 * gamma(g.shape[-1] + 2, u))
        if _trainable(lora_a):
            b = tf.cast(keras.ops.convert_to_tensor(lora_b), g.dtype)
            projected = tf.einsum("btd,rd->btr", g, b) * scale
            error = gamma(g.shape[-1] + 1, u) * abs(scale) * _frobenius64(lora_b) * reach
            forms.append(FactorRounding(EmbeddingGrad(lora_a, flat_ids, projected), error))
        if _trainable(lora_b):
            a = tf.cast(keras.ops.convert_to_tensor(lora_a), g.dtype)
            rows = tf.gather(a, flat_ids) * scale
            # One rounding per entry (the scaling); the gathered rows are exact.
            error = unit_roundoff(g.dtype) * abs(scale) * _frobenius64(lora_a) * reach
            form = OuterProductGrad(lora_b, rows, g, lora_b.shape)
            forms.append(FactorRounding(form, error))
        return forms
