"""Float rounding bounds and row helpers shared by the gradient forms.

Bounds follow the standard error analysis of floating-point sums and dot products (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3): a sum of n terms errs by at
most `gamma_{n-1}` times the sum of the absolute terms, with `gamma_n = n u / (1 - n u)` and u
the unit roundoff.
"""

import math

import keras
import tensorflow as tf

__all__ = [
    "U64",
    "f64",
    "gamma",
    "group_rows",
    "scaled_rows",
    "sum_sq64",
    "unit_roundoff",
]

U64 = 2.0**-53


def unit_roundoff(dtype, matmul=False):
    """The unit roundoff u of `dtype`; with `matmul=True`, of matrix products in that dtype.

    Matrix products in float32 run in TensorFloat-32 (u = 2^-11) on GPUs where TensorFlow
    enables it (its default); everywhere else they round as the dtype.

    Example:
        >>> unit_roundoff("float32") == 2.0**-24
        True
    """
    name = tf.as_dtype(dtype).name
    u = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": U64}[name]
    if matmul and name == "float32" and _tf32_active():
        return 2.0**-11
    return u


def _tf32_active():
    return bool(
        tf.config.experimental.tensor_float_32_execution_enabled()
        and tf.config.list_logical_devices("GPU")
    )


def gamma(n, u):
    """Higham's `gamma_n = n u / (1 - n u)` as a float64 tensor (infinite when `n u >= 1/2`).

    Example:
        >>> float(gamma(2, 0.25))
        inf
        >>> round(float(gamma(10, 2.0**-24)) / (10 * 2.0**-24), 6)
        1.000001
    """
    nu = tf.cast(n, "float64") * u
    return tf.where(nu < 0.5, nu / (1.0 - nu), tf.constant(math.inf, "float64"))


def f64(t):
    return tf.cast(t, "float64")


def _rows_shape(t):
    return [-1] + [1] * (len(t.shape) - 1)


def scaled_rows(t, scale, factors):
    """`t` with example i multiplied by `scale[i]` (None: 1), and zeroed where `factors[i]` is 0.

    A zero factor marks an example whose norm is not finite: it is dropped whole (not
    multiplied by 0, which keeps NaN), so one bad example cannot poison the step. The extra pass
    over `t` runs only in a step that has such an example.
    """
    shape = _rows_shape(t)
    if scale is not None:
        t = t * keras.ops.reshape(keras.ops.cast(scale, t.dtype), shape)
    keep = factors > 0
    return tf.cond(
        tf.reduce_all(keep),
        lambda: t,
        lambda: tf.where(tf.reshape(keep, shape), t, tf.zeros_like(t)),
    )


def group_rows(t, groups):
    """Reshapes `[B, T, ...]` to `[groups, (B // groups) * T, ...]`."""
    shape = tf.shape(t)
    return tf.reshape(t, tf.concat([[groups, -1], shape[2:]], axis=0))


def sum_sq64(t, keep_axes=1):
    """Per-example sum of squares, float64, an upper bound of the exact sum.

    The last axis is reduced in the input dtype (the bound accounts for its rounding: each
    partial sum of n non-negative terms is at least `(1 - gamma_n)` times the exact one), the
    rest in float64.
    """
    if t.dtype == tf.float64 or len(t.shape) <= keep_axes + 1:
        return tf.reduce_sum(tf.square(f64(t)), axis=list(range(keep_axes, len(t.shape))))
    n = t.shape[-1]
    partial = f64(tf.reduce_sum(tf.square(t), axis=-1))
    inflate = 1.0 + 2.0 * gamma(n, unit_roundoff(t.dtype))
    return tf.reduce_sum(partial, axis=list(range(keep_axes, len(t.shape) - 1))) * inflate
