"""The gradient form of an embedding table: each example adds its output gradients to the
rows it looked up (repeated ids add up)."""

import contextlib
import contextvars

import tensorflow as tf

from keras_safe.privacy.per_example.forms import FLOAT64_PRICE, GradientForm
from keras_safe.privacy.per_example.numerics import (
    U64,
    f64,
    gamma,
    group_rows,
    scaled_rows,
    static_size,
    sum_sq64,
    unit_roundoff,
    working,
)

__all__ = ["EmbeddingGrad", "data_dependent_shapes"]

_DATA_DEPENDENT_SHAPES = contextvars.ContextVar("data_dependent_shapes", default=False)


@contextlib.contextmanager
def data_dependent_shapes(allowed=True):
    """Within it (when `allowed`), embedding forms may use ops whose output size depends on
    the data (`tf.where`, `tf.unique`), which XLA cannot compile: keras_safe's train step
    enters it when the model does not compile its step with XLA. Outside it, the forms use only
    ops of static shapes.
    """
    token = _DATA_DEPENDENT_SHAPES.set(bool(allowed))
    try:
        yield
    finally:
        _DATA_DEPENDENT_SHAPES.reset(token)


class EmbeddingGrad(GradientForm):
    """Per-example gradient of an embedding table: rows `ids_i` receive `g_i`.

    Args:
        variable: the table, `[V, D]`.
        ids: `[B, T]` int row indices.
        g: `[B, T, D]` gradients of the looked-up rows.

    The norm sums, per example, the rows that share an id, `sum_{t,s: id_t = id_s} g_t.g_s`:
    for very short sequences in float64; up to `MAX_GRAM_STEPS` positions in float32 plus its
    rounding bound, `(gamma_D + gamma_m) Q_i` with `Q_i = sum_{t,s: id_t = id_s} |g_t| |g_s|`
    and m the number of same-id pairs (only those are summed; the zeros of the mask add no
    rounding), recomputed in float64 in a step where that bound is loose (terms that cancel);
    for longer sequences by summing the rows of each (example, id) pair. Where shapes may
    depend on the data (`data_dependent_shapes`), only the rows of ids repeated within an
    example are summed, in float64, and the others count by their own norms: one pass over
    the gradients instead of a Gram of T^2 D products.
    """

    MAX_GRAM_STEPS = 512

    def __init__(self, variable, ids, g):
        self.variable = variable
        self.ids = ids
        self.g = working(g)

    def group(self, groups):
        ids, g = group_rows(self.ids, groups), group_rows(self.g, groups)
        return EmbeddingGrad(self.variable, ids, g)

    @classmethod
    def concat(cls, forms):
        ids = tf.concat([f.ids for f in forms], axis=1)
        return EmbeddingGrad(forms[0].variable, ids, tf.concat([f.g for f in forms], axis=1))

    def _position_squares(self):
        """Upper bounds of each `|g_t|^2`, float64 `[B, T]`."""
        g_sq = tf.reduce_sum(tf.square(self.g), axis=-1)
        inflate = 1.0 + 2.0 * gamma(self.g.shape[-1] + 1, unit_roundoff(self.g.dtype, True))
        return f64(g_sq) * inflate

    def _bound(self, squares=None):
        """An upper bound of `sum_t |g_t|` (from `_position_squares()` when given)."""
        if squares is None:
            squares = self._position_squares()
        return tf.reduce_sum(tf.sqrt(squares), axis=1) * (1.0 + 1e-12)

    def _unique_rows(self):
        """Rows summed per (example, id): `(rows [U, D], example index [U])`."""
        batch = tf.shape(self.ids, out_type="int64")[0]
        rows = tf.cast(self.variable.shape[0], "int64")
        keys = tf.cast(self.ids, "int64") + tf.range(batch)[:, None] * rows
        unique, index = tf.unique(tf.reshape(keys, [-1]))
        depth = self.g.shape[-1]
        summed = tf.math.unsorted_segment_sum(
            tf.reshape(self.g, [-1, depth]), index, tf.shape(unique)[0]
        )
        return summed, unique // rows, batch

    def _gram64(self, steps):
        bound = self._bound()
        g = f64(self.g)
        same = tf.cast(tf.equal(self.ids[:, :, None], self.ids[:, None, :]), "float64")
        norms_sq = tf.reduce_sum(same * tf.einsum("btd,bsd->bts", g, g), axis=[1, 2])
        count = 2.0 * self.g.shape[-1] + tf.cast(steps, "float64") ** 2 + 8.0
        return norms_sq + count * U64 * tf.square(bound), bound

    def _gram32(self, steps):
        """The float32 Gram norm and its rounding bound; where that bound is loose (terms that
        cancel), the float64 Gram instead, computed only in a step that needs it."""
        u = unit_roundoff(self.g.dtype, matmul=True)
        same = tf.cast(tf.equal(self.ids[:, :, None], self.ids[:, None, :]), self.g.dtype)
        gram = tf.einsum("btd,bsd->bts", self.g, self.g)
        norms_sq = f64(tf.reduce_sum(same * gram, axis=[1, 2]))
        d = self.g.shape[-1]
        # Q_i = sum over same-id pairs of |g_t| |g_s| <= sum_t c_t |g_t|^2 (c_t: how often
        # id_t occurs; (x y <= (x^2 + y^2) / 2)), with |g_t|^2 the Gram diagonal; the number of
        # same-id pairs is sum_t c_t. The inflations cover the float32 rounding.
        counts = tf.reduce_sum(same, axis=2)
        squares = tf.maximum(tf.linalg.diag_part(gram), 0.0)
        q = f64(tf.reduce_sum(counts * squares, axis=1))
        q = q * (1.0 + 2.0 * gamma(d + 1, u)) * (1.0 + 2.0 * gamma(steps + 1, u))
        pairs = f64(tf.reduce_sum(counts, axis=1))
        error = (gamma(d + 2, u) + gamma(pairs + 2.0, u)) * q * (1.0 + 1e-6)
        lengths = tf.sqrt(f64(squares) * (1.0 + 2.0 * gamma(d + 1, u)))
        bound = tf.reduce_sum(lengths, axis=1) * (1.0 + 1e-12)
        loose = tf.reduce_any(error > 1e-4 * norms_sq)
        return tf.cond(loose, lambda: self._gram64(steps), lambda: (norms_sq + error, bound))

    def _repeated_rows(self, steps):
        """The norms with only the rows of repeated ids summed (float64), and `_bound()`.

        Sorting each example's ids puts repeated ids next to each other. A position whose id
        occurs once adds its own `|g_t|^2` (float32, inflated for its rounding); the rows of
        the repeated ids are gathered (a number of rows that depends on the data), summed per
        (example, id) in float64 and squared. The float64 rounding is covered by
        `(2 (T + D) + 8) U64 bound^2`, `bound >= sum_t |g_t|`.
        """
        ids, g = self.ids, self.g
        depth = g.shape[-1]
        squares = self._position_squares()
        bound = self._bound(squares)
        order = tf.argsort(ids, axis=1, stable=True)
        ranked = tf.gather(ids, order, batch_dims=1)
        same = tf.equal(ranked[:, 1:], ranked[:, :-1])  # position t + 1 repeats position t
        edge = tf.zeros_like(same[:, :1])
        repeated = tf.logical_or(tf.concat([edge, same], 1), tf.concat([same, edge], 1))
        ranked_squares = tf.gather(squares, order, batch_dims=1)
        single_sq = tf.reduce_sum(
            tf.where(repeated, tf.zeros_like(ranked_squares), ranked_squares), 1
        )
        where = tf.where(repeated)  # [P, 2]: (example, sorted position)
        example = where[:, 0]
        position = tf.gather_nd(tf.cast(order, "int64"), where)
        rows = f64(tf.gather_nd(g, tf.stack([example, position], axis=1)))
        starts = tf.cast(tf.logical_not(tf.concat([edge, same], 1)), "int64")
        runs = tf.gather_nd(tf.cumsum(starts, axis=1), where) + example * tf.cast(steps, "int64")
        keys, run = tf.unique(runs)
        count = tf.shape(keys)[0]
        sums = tf.math.unsorted_segment_sum(rows, run, count)
        owner = tf.math.unsorted_segment_max(example, run, count)
        batch = tf.shape(ids)[0]
        repeated_sq = tf.math.unsorted_segment_sum(tf.reduce_sum(tf.square(sums), 1), owner, batch)
        slack = (2.0 * (tf.cast(steps, "float64") + depth) + 8.0) * U64 * tf.square(bound)
        return single_sq + repeated_sq + slack, bound

    def norm_bounds(self):
        steps = static_size(self.ids, 1)
        t, d = self.ids.shape[1], self.g.shape[-1]
        if t is not None and d is not None and FLOAT64_PRICE * t <= 8:
            norms_sq, bound = self._gram64(steps)
        elif _DATA_DEPENDENT_SHAPES.get() and d is not None:
            norms_sq, bound = self._repeated_rows(steps)
        elif t is not None and t <= self.MAX_GRAM_STEPS:
            norms_sq, bound = self._gram32(steps)
        else:
            bound = self._bound()
            summed, owner, batch = self._unique_rows()
            per_row = sum_sq64(summed)
            computed = tf.sqrt(tf.math.unsorted_segment_sum(per_row, owner, batch))
            u = unit_roundoff(self.g.dtype)
            norms_sq = tf.square(computed + gamma(steps, u) * bound)
        # The clipped sum: the factor's rounding, then up to T rows added per table row.
        slack = gamma(steps + 1, unit_roundoff(self.g.dtype)) * bound
        return tf.minimum(tf.maximum(norms_sq, 0.0), tf.square(bound)), slack

    def clipped_sum(self, factors):
        weighted = scaled_rows(self.g, factors, factors)
        depth = self.g.shape[-1]
        return tf.math.unsorted_segment_sum(
            tf.reshape(weighted, [-1, depth]),
            tf.reshape(self.ids, [-1]),
            num_segments=self.variable.shape[0],
        )

    def materialise(self):
        batch = tf.shape(self.g)[0]
        rows = self.variable.shape[0]
        keys = tf.cast(self.ids, "int64") + tf.range(batch, dtype="int64")[:, None] * rows
        dense = tf.math.unsorted_segment_sum(
            tf.reshape(self.g, [-1, self.g.shape[-1]]),
            tf.reshape(keys, [-1]),
            num_segments=tf.cast(batch, "int64") * rows,
        )
        error = gamma(static_size(self.ids, 1), unit_roundoff(self.g.dtype)) * self._bound()
        return tf.reshape(dense, [batch, rows, -1]), error
