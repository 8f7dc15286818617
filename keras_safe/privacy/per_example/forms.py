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

Sums that can cancel (Gram matrices of sequences, "ghost clipping") carry the standard
rounding-error bound (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3: a dot
product of length n errs by at most `gamma_n = n u / (1 - n u)` times the sum of the absolute
terms): Dense Gram norms are computed in float64, where that bound is negligible, and capped at
the triangle-inequality bound `S_i = sum_t |a_t| |g_t|`; embedding Gram norms in float32 plus
the bound, recomputed in float64 in a step where the bound is loose. Float32 materialised sums
add `gamma_T * S_i` to their computed norm, and sums of squares are inflated by their own
rounding bound. So the norm used for clipping is never below the exact norm; the float64
rounding of the bounds themselves (relative 1e-12 or less) is the only slack, and the tests
check 1e-5.
"""

import math

import tensorflow as tf

from keras_safe.privacy.per_example.numerics import (
    U64,
    f64,
    gamma,
    group_rows,
    leading,
    norm_bound,
    scaled_rows,
    static_size,
    sum_sq64,
    unit_roundoff,
    weighted_sum,
    working,
)

__all__ = [
    "GradientForm",
    "MaterialisedGrad",
    "OuterProductGrad",
    "SharedBiasGrad",
    "merge",
    "summed_form",
]

FLOAT64_PRICE = 6.0
"""Cost of a float64 multiply-add relative to a float32 one, used to choose a norm method."""


class GradientForm:
    """Base class of the gradient forms: per-example gradients of one variable.

    Subclasses define `norm_bounds`, `clipped_sum`, `group` and `materialise`; `concat`
    returns None unless forms of that kind can be joined without materialising.
    """

    variable = None

    def norm_bounds(self):
        """`(norms_sq, slack)`: float64 `[B]`; slack a float64 `[B]`, or a Python float for
        that fraction of the form's own norm bound. See the module docstring."""
        raise NotImplementedError

    def clipped_sum(self, factors):
        """`sum_i factors[i] * gradient_i`, shaped like the variable; factor 0 drops an example."""
        raise NotImplementedError

    def group(self, groups):
        """The form of the microbatch gradients: examples in `groups` consecutive blocks (a
        count, or `numerics.Blocks(k)`: blocks of k rows, the slots of a user-level batch)."""
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
        self.per_example = working(per_example)
        self.error = error

    def _norms(self):
        return tf.sqrt(sum_sq64(self.per_example))

    def norm_bounds(self):
        # The clipped sum multiplies each row by its factor: one rounding per entry.
        slack = 2.0 * unit_roundoff(self.per_example.dtype)
        if self.error is None:
            return sum_sq64(self.per_example), slack
        return tf.square(self._norms() + self.error), slack

    def clipped_sum(self, factors):
        return weighted_sum(self.per_example, factors)

    def group(self, groups):
        grouped = group_rows(self.per_example[:, None], groups)
        members = static_size(grouped, 1)
        norms = tf.reshape(self._norms(), leading(groups))
        # Summing m rows in float errs by at most gamma_m times the sum of their norms.
        error = gamma(members, unit_roundoff(self.per_example.dtype)) * tf.reduce_sum(norms, 1)
        if self.error is not None:
            error = error + tf.reduce_sum(tf.reshape(self.error, leading(groups)), axis=1)
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
    absolute terms (n: the number of terms per entry; this also covers one rounded product per
    term, as in `x * dz`), so the norm bound holds even when the terms cancel.

    Args:
        variable: the variable.
        terms: `[B, ...]` tensor.
        axis: the axes (not 0) to sum over; an empty list keeps `terms` as they are.
        shape: reshape the rows to `[B, *shape]` (default: the variable's shape).
    """
    shape = tuple(variable.shape if shape is None else shape)
    terms = working(terms)
    axis = sorted(axis)
    if not axis:
        return MaterialisedGrad(variable, tf.reshape(terms, [-1, *shape]))
    values = tf.reshape(tf.reduce_sum(terms, axis=axis), [-1, *shape])
    sizes = [terms.shape[a] for a in axis]
    if all(size == 1 for size in sizes):
        return MaterialisedGrad(variable, values)
    count = (
        math.prod(sizes) if None not in sizes else tf.reduce_prod(tf.gather(tf.shape(terms), axis))
    )
    magnitude = tf.reduce_sum(tf.abs(terms), axis=axis)
    size = tf.sqrt(sum_sq64(tf.reshape(magnitude, [tf.shape(magnitude)[0], -1])))
    # gamma_n, not gamma_{n-1}: also covers one rounded product per term (such as x * dz).
    error = gamma(count, unit_roundoff(terms.dtype)) * size * (1.0 + 1e-6)
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
        a_norm_bound: optional float64 `[B]` (grouped: `[B, G]`): an upper bound of each
            example's `||A_i||_F` (per group) that the rule can get more cheaply than a pass
            over `a`; used only in the rounding bounds.
        g_norm_bound: the same for `||G_i||_F`, when the rule computed it anyway.

    The norm comes from whichever is cheaper: for T = 1 the product `|a|^2 |g|^2`; else the
    Gram form `sum_{t,s} (a_t.a_s)(g_t.g_s)` in float64 with its rounding bound, or the
    materialised float32 gradient plus `gamma_T S_i` ("mixed ghost clipping", Bu et al. 2022,
    with the float64 price counted). A materialised gradient also gives the clipped sum, as a
    weighted sum over examples, instead of a second pass over the positions.
    """

    _g_sum_sq = None  # `g_sum_sq()` once computed
    _scaled_g = None  # `(factors, scaled g)` once computed

    def __init__(self, variable, a, g, shape, a_norm_bound=None, g_norm_bound=None):
        self.variable = variable
        self.a = working(a)
        self.g = working(g)
        self.shape = tuple(shape)
        self.grouped = len(a.shape) == 4
        self.a_norm_bound = a_norm_bound
        self.g_norm_bound = g_norm_bound
        self._rows = None

    def _spec(self, pattern):
        return pattern.replace("G", "j" if self.grouped else "")

    def group(self, groups):
        def joined(bound):  # the Frobenius norm of the members' rows put together
            if bound is None:
                return None
            return tf.sqrt(tf.reduce_sum(tf.square(group_rows(bound[:, None], groups)), 1))

        a, g = group_rows(self.a, groups), group_rows(self.g, groups)
        bounds = joined(self.a_norm_bound), joined(self.g_norm_bound)
        return OuterProductGrad(self.variable, a, g, self.shape, *bounds)

    @classmethod
    def concat(cls, forms):
        first = forms[0]
        if any(f.grouped != first.grouped or f.shape != first.shape for f in forms):
            return None
        a = tf.concat([f.a for f in forms], axis=1)
        g = tf.concat([f.g for f in forms], axis=1)

        def joined(bounds):
            if any(b is None for b in bounds):
                return None
            return tf.sqrt(tf.add_n([tf.square(b) for b in bounds]))

        a_bound = joined([f.a_norm_bound for f in forms])
        g_bound = joined([f.g_norm_bound for f in forms])
        return OuterProductGrad(first.variable, a, g, first.shape, a_bound, g_bound)

    def _dims(self):
        t, k, o = self.a.shape[1], self.a.shape[-1], self.g.shape[-1]
        groups = self.a.shape[2] if self.grouped else 1
        return t, k, o, groups

    def _steps(self):
        return static_size(self.a, 1)

    def _position_norms_bound(self):
        """`S_i = sum_t |a_t| |g_t|` (summed over groups), float64, an upper bound.

        With `a_norm_bound` (a bound of each example's `||A_i||_F`, per group, that the rule got
        cheaply, such as from a convolution's input), the Cauchy-Schwarz bound
        `||A_i||_F ||G_i||_F >= S_i` spares a pass over `a`.
        """
        if self.a_norm_bound is not None:
            g_norm = self.g_norm_bound
            if g_norm is None:
                g_norm = norm_bound(self.g, [1, 3] if self.grouped else [1, 2])
            terms = f64(g_norm) * f64(self.a_norm_bound)
            return tf.reduce_sum(tf.reshape(terms, [tf.shape(terms)[0], -1]), axis=1)
        terms = norm_bound(self.a, [-1]) * norm_bound(self.g, [-1])
        return tf.reduce_sum(tf.reshape(terms, [tf.shape(terms)[0], -1]), axis=1) * (1.0 + 1e-12)

    def _method(self):
        t, k, o, _ = self._dims()
        if t == 1 and not self.grouped:
            return "product"
        if t is None or k is None or o is None:
            return "outer"
        gram_cost = FLOAT64_PRICE * t * t * (k + o)
        outer_cost = t * k * o + k * o
        return "gram" if gram_cost < outer_cost else "outer"

    def g_sum_sq(self):
        """`sum_sq64(g)` per example, computed once (a Dense bias form shares it)."""
        if self._g_sum_sq is None:
            self._g_sum_sq = sum_sq64(self.g)
        return self._g_sum_sq

    def scaled_g(self, factors):
        """`g` with example i scaled by `factors[i]` (dropped where it is 0), computed once for
        the same `factors` (a Dense bias form sums its rows)."""
        if self._scaled_g is None or self._scaled_g[0] is not factors:
            self._scaled_g = (factors, scaled_rows(self.g, factors, factors))
        return self._scaled_g[1]

    def _materialised(self):
        """The per-example gradients `[B, K, (G,) O]`, float32, computed once."""
        if self._rows is None:
            self._rows = tf.einsum(self._spec("btGk,btGo->bkGo"), self.a, self.g)
        return self._rows

    def norm_bounds(self):
        method = self._method()
        u_mm = unit_roundoff(self.a.dtype, matmul=True)
        steps = self._steps()
        if method == "product":
            # Scaling g by the factor and one product per entry: two roundings.
            return sum_sq64(self.a) * self.g_sum_sq(), gamma(2, u_mm)
        if method == "outer":
            computed = tf.sqrt(sum_sq64(self._materialised()))
            # The float sum over positions errs by at most gamma_T S_i; the clipped sum then
            # scales the computed rows, one rounding per entry.
            exact = computed + gamma(steps, u_mm) * self._position_norms_bound()
            return tf.square(exact), 2.0 * unit_roundoff(self.a.dtype)
        a, g = f64(self.a), f64(self.g)
        gram_a = tf.einsum(self._spec("btGk,bsGk->bGts"), a, a)
        gram_g = tf.einsum(self._spec("btGo,bsGo->bGts"), g, g)
        norms_sq = tf.reduce_sum(tf.reshape(gram_a * gram_g, [tf.shape(a)[0], -1]), axis=1)
        _, k, o, groups = self._dims()
        # S_i from the Gram diagonals |a_t|^2 |g_t|^2 (float64, so exact to ~1e-16).
        diagonal = tf.linalg.diag_part(gram_a) * tf.linalg.diag_part(gram_g)
        bound = tf.reduce_sum(
            tf.reshape(tf.sqrt(tf.maximum(diagonal, 0.0)), [tf.shape(a)[0], -1]), 1
        )
        bound = bound * (1.0 + (k + o + 8) * U64)
        count = 2.0 * (k + o) + groups * tf.cast(steps, "float64") ** 2 + 8.0
        norms_sq = norms_sq + count * U64 * tf.square(bound)
        norms_sq = tf.minimum(tf.maximum(norms_sq, 0.0), tf.square(bound))
        # The clipped sum: the factor's rounding, then T products summed per entry.
        return norms_sq, gamma(steps + 1, u_mm) * bound

    def clipped_sum(self, factors):
        if self._method() == "outer":
            grad = weighted_sum(self._materialised(), factors)
        else:
            grad = tf.einsum(
                self._spec("btGk,btGo->kGo"),
                scaled_rows(self.a, None, factors),
                self.scaled_g(factors),
            )
        return tf.reshape(grad, self.shape)

    def materialise(self):
        error = gamma(self._steps(), unit_roundoff(self.a.dtype, matmul=True))
        error = error * self._position_norms_bound()
        return tf.reshape(self._materialised(), [-1, *self.shape]), error


class SharedBiasGrad(MaterialisedGrad):
    """The bias of a layer whose kernel form is an `OuterProductGrad` with one position
    (T = 1): the per-example gradient is the kernel form's `g_i`, so the sum of squares and
    the scaled rows are the kernel form's, computed once for both variables.

    Bounds as `MaterialisedGrad`: `sum_sq64(g)` bounds `||g_i||^2` (the same values), and the
    clipped sum rounds each entry once, when scaling by the factor; examples with factor 0 are
    dropped whole, as in `weighted_sum`. Grouping or joining gives plain `MaterialisedGrad`s.
    """

    def __init__(self, variable, kernel_form):
        super().__init__(variable, tf.reshape(kernel_form.g, [-1, *variable.shape]))
        self.kernel_form = kernel_form

    def norm_bounds(self):
        return self.kernel_form.g_sum_sq(), 2.0 * unit_roundoff(self.per_example.dtype)

    def clipped_sum(self, factors):
        total = tf.reduce_sum(self.kernel_form.scaled_g(factors), axis=[0, 1])
        return tf.reshape(total, self.variable.shape)


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
