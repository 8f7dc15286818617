"""Gradient forms: what a rule knows about one variable's per-example gradients.

A form holds the factors of every example's gradient of one variable (for a Dense kernel, the
layer's inputs `a_t` and output gradients `g_t`, gradient `sum_t a_t g_t^T`) and knows how to

- give, per example, a rigorous upper bound of the gradient's norm (`norm_bounds`),
- sum the gradients scaled by per-example factors (`clipped_sum`),
- group examples into microbatches (`group`), join with a form of the same kind for the same
  variable (`concat`), or materialise itself (`materialise`) when forms of different kinds meet.

Norms are never underestimated. `norm_bounds()` returns `(norms_sq, slack)` in float64 with:

- `sqrt(norms_sq)` at least the exact norm of the example's gradient (exact arithmetic on the
  recorded factors);
- `sqrt(norms_sq) + slack` at least the norm of what the example adds to the computed
  `clipped_sum`, divided by its factor (the float rounding of the sum itself).

Sums that can cancel (Gram matrices of sequences, "ghost clipping") are computed in float64,
plus the standard rounding-error bound (Higham, *Accuracy and Stability of Numerical
Algorithms*, ch. 3: a dot product of length n errs by at most `gamma_n = n u / (1 - n u)` times
the sum of the absolute terms), capped at the triangle-inequality bound
`S_i = sum_t |a_t| |g_t|`. Float32 materialised sums add `gamma_T * S_i` to their computed norm.
"""

import tensorflow as tf

from keras_safe.privacy.per_example.numerics import (
    U64,
    f64,
    gamma,
    group_rows,
    scaled_rows,
    sum_sq64,
    unit_roundoff,
)

__all__ = [
    "EmbeddingGrad",
    "GradientForm",
    "MaterialisedGrad",
    "OuterProductGrad",
    "merge",
    "summed_form",
]

FLOAT64_PRICE = 2.0
"""Cost of a float64 multiply-add relative to a float32 one, used to choose a norm method."""


class GradientForm:
    """Base class of the gradient forms: per-example gradients of one variable.

    Subclasses define `norm_bounds`, `clipped_sum`, `group` and `materialise`; `concat`
    returns None unless forms of that kind can be joined without materialising.
    """

    variable = None

    def norm_bounds(self):
        """`(norms_sq, slack)`, float64 `[B]` each; see the module docstring."""
        raise NotImplementedError

    def clipped_sum(self, factors):
        """`sum_i factors[i] * gradient_i`, shaped like the variable; factor 0 drops an example."""
        raise NotImplementedError

    def group(self, groups):
        """The form of the microbatch gradients: examples in `groups` consecutive blocks."""
        raise NotImplementedError

    def materialise(self):
        """`(per_example, error)`: `[B, *variable.shape]` and a float64 `[B]` error bound."""
        raise NotImplementedError

    @classmethod
    def concat(cls, forms):
        """One form for several forms of this kind for the same variable, or None."""
        return None


class MaterialisedGrad(GradientForm):
    """Per-example gradients held in full: `[B, *variable.shape]`.

    Args:
        variable: the variable.
        per_example: the gradients, one row per example.
        error: optional float64 `[B]`: a bound on the norm of the difference between the
            computed rows and the exact gradients (for rows that are float sums of terms).
    """

    def __init__(self, variable, per_example, error=None):
        self.variable = variable
        self.per_example = per_example
        self.error = error

    def _norms(self):
        flat = tf.reshape(self.per_example, [tf.shape(self.per_example)[0], -1])
        size = tf.cast(tf.shape(flat)[1], "float64")
        return tf.sqrt(sum_sq64(flat) * (1.0 + (size + 2.0) * U64))

    def norm_bounds(self):
        computed = self._norms()
        exact = computed if self.error is None else computed + self.error
        # The clipped sum multiplies each row by its factor: one rounding per entry.
        return tf.square(exact), computed * (2.0 * unit_roundoff(self.per_example.dtype))

    def clipped_sum(self, factors):
        return tf.reduce_sum(scaled_rows(self.per_example, factors, factors), axis=0)

    def group(self, groups):
        grouped = group_rows(self.per_example[:, None], groups)
        members = tf.shape(grouped)[1]
        norms = tf.reshape(self._norms(), [groups, -1])
        # Summing m rows in float errs by at most gamma_m times the sum of their norms.
        error = gamma(members, unit_roundoff(self.per_example.dtype)) * tf.reduce_sum(norms, 1)
        if self.error is not None:
            error = error + tf.reduce_sum(tf.reshape(self.error, [groups, -1]), axis=1)
        return MaterialisedGrad(self.variable, tf.reduce_sum(grouped, axis=1), error)

    def materialise(self):
        return self.per_example, self.error

    @classmethod
    def concat(cls, forms):
        """The rows of all forms added; the float sum carries its rounding bound."""
        values = [f.per_example for f in forms]
        total = tf.add_n(values)
        magnitude = tf.add_n([tf.abs(v) for v in values])
        flat = tf.reshape(magnitude, [tf.shape(magnitude)[0], -1])
        error = gamma(len(values) - 1, unit_roundoff(total.dtype)) * tf.sqrt(sum_sq64(flat))
        error = error * (1.0 + 1e-6)
        for form in forms:
            if form.error is not None:
                error = error + form.error
        return MaterialisedGrad(forms[0].variable, total, error)


def summed_form(variable, terms, axis, shape=None):
    """A `MaterialisedGrad` of per-example gradients that are sums of `terms` over `axis`.

    The float sum carries its rounding bound, `gamma_n` times the norm of the sum of the
    absolute terms (n: the number of terms per entry), so the norm bound holds even when the
    terms cancel.

    Args:
        variable: the variable.
        terms: `[B, ...]` tensor.
        axis: the axes (not 0) to sum over; an empty list keeps `terms` as they are.
        shape: reshape the rows to `[B, *shape]` (default: the variable's shape).
    """
    shape = tuple(variable.shape if shape is None else shape)
    axis = sorted(axis)
    if not axis:
        return MaterialisedGrad(variable, tf.reshape(terms, [-1, *shape]))
    values = tf.reshape(tf.reduce_sum(terms, axis=axis), [-1, *shape])
    sizes = [terms.shape[a] for a in axis]
    if all(size == 1 for size in sizes):
        return MaterialisedGrad(variable, values)
    count = tf.reduce_prod(tf.gather(tf.shape(terms), axis))
    magnitude = tf.reduce_sum(tf.abs(terms), axis=axis)
    size = tf.sqrt(sum_sq64(tf.reshape(magnitude, [tf.shape(magnitude)[0], -1])))
    error = gamma(count - 1, unit_roundoff(terms.dtype)) * size * (1.0 + 1e-6)
    return MaterialisedGrad(variable, values, error)


class OuterProductGrad(GradientForm):
    """Per-example gradient `sum_t a_t g_t^T`, reshaped to `shape`.

    Args:
        variable: the variable.
        a: `[B, T, K]` (or `[B, T, G, K]` for G independent groups, as in a grouped
            convolution: group j's gradient is `sum_t a_tj g_tj^T`).
        g: `[B, T, O]` (or `[B, T, G, O]`).
        shape: the variable's shape; the gradient `[K, O]` (grouped: `[K, G, O]`) is reshaped
            to it.

    The norm comes from whichever is cheaper: for T = 1 the product `|a|^2 |g|^2` (float64),
    else the Gram form `sum_{t,s} (a_t.a_s)(g_t.g_s)` in float64 with its rounding bound, or the
    materialised float32 gradient plus `gamma_T S_i` ("mixed ghost clipping", Bu et al. 2022,
    with the float64 price counted).
    """

    def __init__(self, variable, a, g, shape):
        self.variable = variable
        self.a = a
        self.g = g
        self.shape = tuple(shape)
        self.grouped = len(a.shape) == 4

    def _spec(self, pattern):
        return pattern.replace("G", "j" if self.grouped else "")

    def group(self, groups):
        return OuterProductGrad(
            self.variable, group_rows(self.a, groups), group_rows(self.g, groups), self.shape
        )

    @classmethod
    def concat(cls, forms):
        first = forms[0]
        if any(f.grouped != first.grouped or f.shape != first.shape for f in forms):
            return None
        a = tf.concat([f.a for f in forms], axis=1)
        g = tf.concat([f.g for f in forms], axis=1)
        return OuterProductGrad(first.variable, a, g, first.shape)

    def _dims(self):
        t, k, o = self.a.shape[1], self.a.shape[-1], self.g.shape[-1]
        groups = self.a.shape[2] if self.grouped else 1
        return t, k, o, groups

    def _steps(self):
        return tf.shape(self.a)[1]

    def _position_norms_bound(self):
        """`S_i = sum_t |a_t| |g_t|` (summed over groups), float64, an upper bound."""
        a_sq = f64(tf.reduce_sum(tf.square(self.a), axis=-1))
        g_sq = f64(tf.reduce_sum(tf.square(self.g), axis=-1))
        k, o = self.a.shape[-1], self.g.shape[-1]
        u = unit_roundoff(self.a.dtype)
        inflate = (1.0 + 2.0 * gamma(k, u)) * (1.0 + 2.0 * gamma(o, unit_roundoff(self.g.dtype)))
        terms = tf.sqrt(a_sq * g_sq * inflate)
        return tf.reduce_sum(tf.reshape(terms, [tf.shape(terms)[0], -1]), axis=1) * (1.0 + 1e-12)

    def _method(self):
        t, k, o, _ = self._dims()
        if t == 1 and not self.grouped:
            return "product"
        if t is None or k is None or o is None:
            return "outer"
        gram_cost = FLOAT64_PRICE * t * t * (k + o)
        outer_cost = t * k * o + FLOAT64_PRICE * k * o
        return "gram" if gram_cost < outer_cost else "outer"

    def norm_bounds(self):
        method = self._method()
        u_mm = unit_roundoff(self.a.dtype, matmul=True)
        steps = self._steps()
        if method == "product":
            a, g = f64(self.a[:, 0]), f64(self.g[:, 0])
            k, o = self.a.shape[-1], self.g.shape[-1]
            norms_sq = tf.reduce_sum(tf.square(a), 1) * tf.reduce_sum(tf.square(g), 1)
            norms_sq = norms_sq * (1.0 + (k + o + 4) * U64)
            # Scaling g by the factor and one product per entry: two roundings.
            return norms_sq, tf.sqrt(norms_sq) * gamma(2, u_mm)
        bound = self._position_norms_bound()
        # The clipped sum: the factor's rounding, then T products summed per entry.
        slack = gamma(steps + 1, u_mm) * bound
        if method == "gram":
            a, g = f64(self.a), f64(self.g)
            gram_a = tf.einsum(self._spec("btGk,bsGk->bGts"), a, a)
            gram_g = tf.einsum(self._spec("btGo,bsGo->bGts"), g, g)
            norms_sq = tf.reduce_sum(tf.reshape(gram_a * gram_g, [tf.shape(a)[0], -1]), axis=1)
            _, k, o, groups = self._dims()
            count = 2.0 * (k + o) + groups * tf.cast(steps, "float64") ** 2 + 8.0
            norms_sq = norms_sq + count * U64 * tf.square(bound)
        else:
            per_example = tf.einsum(self._spec("btGk,btGo->bkGo"), self.a, self.g)
            computed = tf.sqrt(sum_sq64(per_example))
            norms_sq = tf.square(computed + gamma(steps, u_mm) * bound)
        norms_sq = tf.minimum(tf.maximum(norms_sq, 0.0), tf.square(bound))
        return norms_sq, slack

    def clipped_sum(self, factors):
        grad = tf.einsum(
            self._spec("btGk,btGo->kGo"),
            scaled_rows(self.a, None, factors),
            scaled_rows(self.g, factors, factors),
        )
        return tf.reshape(grad, self.shape)

    def materialise(self):
        per_example = tf.einsum(self._spec("btGk,btGo->bkGo"), self.a, self.g)
        error = gamma(self._steps(), unit_roundoff(self.a.dtype, matmul=True))
        error = error * self._position_norms_bound()
        return tf.reshape(per_example, [-1, *self.shape]), error


class EmbeddingGrad(GradientForm):
    """Per-example gradient of an embedding table: rows `ids_i` receive `g_i`.

    Args:
        variable: the table, `[V, D]`.
        ids: `[B, T]` int row indices.
        g: `[B, T, D]` gradients of the looked-up rows.

    The norm sums, per example, the rows that share an id: for short sequences by the Gram
    form `sum_{t,s: id_t = id_s} g_t.g_s` in float64, otherwise by summing the rows of each
    (example, id) pair in float32 (its rounding added to the bound).
    """

    def __init__(self, variable, ids, g):
        self.variable = variable
        self.ids = ids
        self.g = g

    def group(self, groups):
        ids, g = group_rows(self.ids, groups), group_rows(self.g, groups)
        return EmbeddingGrad(self.variable, ids, g)

    @classmethod
    def concat(cls, forms):
        ids = tf.concat([f.ids for f in forms], axis=1)
        return EmbeddingGrad(forms[0].variable, ids, tf.concat([f.g for f in forms], axis=1))

    def _bound(self):
        g_sq = f64(tf.reduce_sum(tf.square(self.g), axis=-1))
        inflate = 1.0 + 2.0 * gamma(self.g.shape[-1], unit_roundoff(self.g.dtype))
        return tf.reduce_sum(tf.sqrt(g_sq * inflate), axis=1) * (1.0 + 1e-12)

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

    def norm_bounds(self):
        steps = tf.shape(self.ids)[1]
        bound = self._bound()
        u = unit_roundoff(self.g.dtype)
        slack = gamma(steps + 1, u) * bound
        t, d = self.ids.shape[1], self.g.shape[-1]
        if t is not None and d is not None and FLOAT64_PRICE * t <= 8:
            g = f64(self.g)
            same = tf.cast(tf.equal(self.ids[:, :, None], self.ids[:, None, :]), "float64")
            gram = tf.einsum("btd,bsd->bts", g, g)
            norms_sq = tf.reduce_sum(same * gram, axis=[1, 2])
            count = 2.0 * d + tf.cast(steps, "float64") ** 2 + 8.0
            norms_sq = norms_sq + count * U64 * tf.square(bound)
        else:
            summed, owner, batch = self._unique_rows()
            per_row = sum_sq64(summed)
            computed = tf.sqrt(tf.math.unsorted_segment_sum(per_row, owner, batch))
            norms_sq = tf.square(computed + gamma(steps, u) * bound)
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
        error = gamma(tf.shape(self.ids)[1], unit_roundoff(self.g.dtype)) * self._bound()
        return tf.reshape(dense, [batch, rows, -1]), error


def merge(forms):
    """One form for a variable that several recorded calls produced forms for.

    Forms of one kind that can be joined (`concat`: outer products of a layer called on several
    inputs, a recurrent cell's time steps) are joined; otherwise every form materialises itself
    and the rows are added.
    """
    if len(forms) == 1:
        return forms[0]
    kind = type(forms[0])
    if all(type(f) is kind for f in forms):
        joined = kind.concat(forms)
        if joined is not None:
            return joined
    parts = [f.materialise() for f in forms]
    dtype = parts[0][0].dtype
    rows = [MaterialisedGrad(forms[0].variable, tf.cast(v, dtype), e) for v, e in parts]
    return MaterialisedGrad.concat(rows)
