"""Float rounding bounds and row helpers shared by the gradient forms.

Bounds follow the standard error analysis of floating-point sums and dot products (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., ch. 3): a sum of n terms errs by at
most `gamma_{n-1}` times the sum of the absolute terms, with `gamma_n = n u / (1 - n u)` and u
the unit roundoff.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from keras_safe._validation import fail

__all__ = [
    "U64",
    "Blocks",
    "f64",
    "gamma",
    "group_rows",
    "leading",
    "norm_bound",
    "scaled_rows",
    "static_size",
    "sum_sq64",
    "unit_roundoff",
    "weighted_sum",
    "working",
]

U64 = 2.0**-53


def unit_roundoff(dtype, matmul=False):
    """The unit roundoff u of `dtype`; with `matmul=True`, of matrix products in that dtype.

    Matrix products in float32 run in TensorFloat-32 (u = 2^-11) on GPUs where TensorFlow
    enables it (its default); everywhere else they round as the dtype. The norm bounds follow,
    so on such a GPU they are looser (each example is clipped a little harder); call
    `tf.config.experimental.enable_tensor_float_32_execution(False)` for float32 products and
    tight bounds.

    Example:
        >>> unit_roundoff("float32") == 2.0**-24
        True
    """
    name = tf.as_dtype(dtype).name
    table = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": U64}
    if name not in table:
        fail(
            "dtype",
            name,
            "a floating-point dtype (the per-example gradient norms of a trainable layer are "
            "computed in the dtype of its inputs)",
            "cast the layer's integer inputs to float before it, for example with "
            "keras.layers.Rescaling(1.0) or by giving the Input a float dtype.",
        )
    u = table[name]
    if matmul and name == "float32" and _tf32_active():
        return 2.0**-11
    return u


def _tf32_active():
    return bool(
        tf.config.experimental.tensor_float_32_execution_enabled()
        and tf.config.list_logical_devices("GPU")
    )


def gamma(n, u):
    """Higham's `gamma_n = n u / (1 - n u)`: infinite when `n u >= 1/2`.

    A Python float for a Python `n` (no graph ops), else a float64 tensor.

    Example:
        >>> gamma(2, 0.25)
        inf
        >>> round(gamma(10, 2.0**-24) / (10 * 2.0**-24), 6)
        1.000001
    """
    if isinstance(n, (int, float)):
        nu = n * u
        return nu / (1.0 - nu) if nu < 0.5 else math.inf
    nu = tf.cast(n, "float64") * u
    return tf.where(nu < 0.5, nu / (1.0 - nu), tf.constant(math.inf, "float64"))


def static_size(t, axis):
    """`t.shape[axis]` when known while tracing (a Python int), else the tensor size."""
    size = t.shape[axis]
    return tf.shape(t)[axis] if size is None else int(size)


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


def weighted_sum(rows, factors):
    """`sum_i factors[i] * rows[i]` as one matrix-vector product; rows whose factor is 0 are
    dropped whole (a NaN row does not spread), at no cost in a step without such rows."""
    flat = tf.reshape(rows, [tf.shape(rows)[0], -1])
    keep = factors > 0
    flat = tf.cond(
        tf.reduce_all(keep),
        lambda: flat,
        lambda: tf.where(keep[:, None], flat, tf.zeros_like(flat)),
    )
    total = tf.linalg.matvec(flat, tf.cast(factors, flat.dtype), transpose_a=True)
    return tf.reshape(total, tf.shape(rows)[1:])


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Groups of `size` consecutive rows, however many rows the batch has: the slots of a
    user-level batch, one user's examples in each (`keras_safe.privacy.poisson_batches` with
    `users`). Where a group count is expected, `Blocks(k)` groups by size instead."""

    size: int


def leading(groups):
    """The leading shape `[groups, members]` of a grouped reshape: `[M, -1]` for a count M,
    `[-1, k]` for `Blocks(k)`."""
    return [-1, groups.size] if isinstance(groups, Blocks) else [groups, -1]


def group_rows(t, groups):
    """Reshapes `[B, T, ...]` to `[groups, (B // groups) * T, ...]` (a count of groups), or to
    `[B // k, k * T, ...]` for `Blocks(k)` (with its static shape kept where known)."""
    shape = tf.shape(t)
    if not isinstance(groups, Blocks):
        return tf.reshape(t, tf.concat([[groups, -1], shape[2:]], axis=0))
    grouped = tf.reshape(t, tf.concat([[-1, groups.size * shape[1]], shape[2:]], axis=0))
    inner = t.shape[1] if t.shape.rank is not None and t.shape.rank > 1 else None
    if t.shape.rank is not None:
        grouped.set_shape([None, None if inner is None else groups.size * inner, *t.shape[2:]])
    return grouped


def _block(n):
    """A divisor of n near sqrt(n) (1 when there is none above sqrt(n) / 4)."""
    best = 1
    for c in range(1, math.isqrt(n) + 1):
        if n % c == 0:
            best = c
    return best if best * best * 16 >= n else 1


def norm_bound(t, axes):
    """float64 upper bound of the Euclidean norm of `t` over `axes` (one float32 pass).

    The rounded squares are summed and the square root rounded, so the computed norm of n terms
    is at least `(1 - u) sqrt(1 - gamma_n)` times the exact one, whatever the summation order;
    it is inflated by `(1 + 2 gamma_n)(1 + 2 u)`. (`tf.math.reduce_euclidean_norm` would fuse
    the pass on CPU, but has no XLA kernel.)
    """
    t = working(t)
    sizes = [t.shape[a] for a in axes]
    count = math.prod(sizes) if None not in sizes else tf.reduce_prod(tf.gather(tf.shape(t), axes))
    u = unit_roundoff(t.dtype)
    norms = f64(tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes)))
    return norms * ((1.0 + 2.0 * gamma(count, u)) * (1.0 + 2.0 * u))


def sum_sq64(t):
    """Per-example sums of squares (over every axis but the first), float64 upper bounds.

    The squares are summed in float32 in n / c blocks of c terms (c a divisor of n near
    sqrt(n), else n; block j holds the entries j, j + n / c, ..., the columns of a `[c, n / c]`
    view, so that the float32 pass adds whole rows, which vectorises), and the block sums are
    summed in float64. All terms are nonnegative, so a computed block sum is at least
    `1 - gamma_c` times the exact one whatever the order of the additions (Higham 2002, ch. 3);
    the bound exceeds the exact sum by about `c u` relative, at the cost of one float32 pass.
    Where `gamma_c` reaches 1/2 there is no useful bound: infinite, and the example is dropped.
    """
    t = working(t)
    n = t.shape[1:].num_elements()
    if t.dtype == tf.float64 or n is None or n <= 32:
        flat = tf.reshape(t, [tf.shape(t)[0], -1])
        squares = tf.reduce_sum(tf.square(f64(flat)), axis=1)
        count = n if n is not None else tf.shape(flat)[1]
        return squares * (1.0 + 2.0 * gamma(count, U64))
    c = _block(n)
    if c == 1:  # no divisor near sqrt(n): one block of n terms
        c = n
    blocks = tf.reduce_sum(tf.square(tf.reshape(t, [-1, c, n // c])), axis=1)
    lost = gamma(c, unit_roundoff(t.dtype))  # computed block >= (1 - lost) exact block
    if lost >= 0.5:
        return tf.fill([tf.shape(t)[0]], tf.constant(math.inf, "float64"))
    # 1 + 2 gamma_m covers the float64 sum of the m = n / c blocks (exact as float64 values);
    # 4 U64 the rounding of the constant and of the product.
    scale = (1.0 + 2.0 * gamma(n // c, U64)) / (1.0 - lost) * (1.0 + 4.0 * U64)
    return tf.reduce_sum(f64(blocks), axis=1) * scale


def working(t):
    """`t` in the precision the forms compute in: 16-bit floats go up to float32.

    Mixed-precision models record bfloat16 or float16 factors; summed in 16 bits, a sum of a few
    hundred terms has no useful rounding bound (`gamma_n` is infinite once `n u >= 1/2`), so the
    forms work on the recorded values in float32 (the variables are float32 anyway).
    """
    t = tf.convert_to_tensor(t)
    if t.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(t, tf.float32)
    return t
