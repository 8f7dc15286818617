"""Gradient forms against float64 numpy: norm bounds, clipped sums, grouping and merging.

A form's `norm_bounds()` must never be below the exact norm (numpy float64 on the same factors)
and, on ordinary data, must not be far above it; `clipped_sum` must equal the weighted sum of
the exact per-example gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe.privacy.per_example import (
    EmbeddingGrad,
    MaterialisedGrad,
    OuterProductGrad,
    embedding_form,
    numerics,
    summed_form,
)
from keras_safe.privacy.per_example.forms import merge
from keras_safe.privacy.per_example.numerics import gamma, norm_bound, sum_sq64, unit_roundoff

RNG = np.random.default_rng(3)


def _bound(form):
    """The norm bound and the absolute slack (a float slack is relative to the bound)."""
    norms_sq, slack = form.norm_bounds()
    bound = np.sqrt(np.asarray(norms_sq))
    return bound, bound * slack if isinstance(slack, float) else np.asarray(slack)


def _variable(shape):
    return keras.Variable(np.zeros(shape, "float32"))


def _outer_exact(a, g):
    return np.einsum("btk,bto->bko", a.astype("float64"), g.astype("float64"))


@pytest.mark.parametrize(
    "steps, k, o",
    [(1, 7, 5), (3, 40, 50), (6, 3, 4), (9, 6, 5)],
    ids=["product", "gram", "outer_small", "outer"],
)
def test_outer_product_bounds_and_sum(steps, k, o):
    a = RNG.normal(size=(5, steps, k)).astype("float32")
    g = RNG.normal(size=(5, steps, o)).astype("float32")
    form = OuterProductGrad(_variable((k, o)), tf.constant(a), tf.constant(g), (k, o))
    exact = _outer_exact(a, g)
    norms = np.linalg.norm(exact.reshape(5, -1), axis=1)
    bound, slack = _bound(form)
    assert np.all(bound >= norms) and np.all(bound <= norms * (1 + 1e-4))
    assert np.all(slack >= 0) and np.all(slack <= norms * 1e-4)
    factors = np.array([1.0, 0.5, 0.0, 2.0, 0.25], "float32")
    got = np.asarray(form.clipped_sum(tf.constant(factors)))
    np.testing.assert_allclose(got, np.einsum("b,bko->ko", factors, exact), rtol=1e-5, atol=1e-5)


def test_grouped_outer_product_matches_per_group_products():
    a = RNG.normal(size=(4, 5, 3, 6)).astype("float32")  # [B, T, G, K]
    g = RNG.normal(size=(4, 5, 3, 2)).astype("float32")  # [B, T, G, O]
    form = OuterProductGrad(_variable((6, 6)), tf.constant(a), tf.constant(g), (6, 6))
    exact = np.einsum("btjk,btjo->bkjo", a.astype("float64"), g.astype("float64"))
    bound, _ = _bound(form)
    norms = np.linalg.norm(exact.reshape(4, -1), axis=1)
    assert np.all(bound >= norms) and np.all(bound <= norms * (1 + 1e-4))
    got = np.asarray(form.clipped_sum(tf.ones([4])))
    np.testing.assert_allclose(got, exact.sum(0).reshape(6, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [2, 5], ids=["gram", "outer"])
def test_outer_product_bound_survives_cancellation(steps):
    # Rows that cancel: a_1 = M v, a_2 = -M v + d, same g: exact gradient d g^T.
    k = 16 if steps == 2 else 3
    v = RNG.normal(size=k)
    d = RNG.normal(size=k) * 1e3
    a = np.zeros((1, steps, k), "float32")
    a[0, 0], a[0, 1] = 1e8 * v, -1e8 * v + d
    g = np.ones((1, steps, k), "float32") * 0.01
    g[0, 2:] = 0
    form = OuterProductGrad(_variable((k, k)), tf.constant(a), tf.constant(g), (k, k))
    exact = np.linalg.norm(_outer_exact(a, g).reshape(1, -1), axis=1)
    bound, slack = _bound(form)
    assert np.all(bound >= exact)
    # The clipped contribution is bounded too: bound + slack covers its rounding.
    got = np.asarray(form.clipped_sum(tf.ones([1])), "float64")
    assert np.linalg.norm(got) <= bound[0] + slack[0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static_shapes", "repeated_rows"])
@pytest.mark.parametrize("steps", [3, 10, 40], ids=["gram64", "gram32", "long"])
def test_embedding_bounds_and_sum(steps, dynamic):
    # Static shapes: the float64 Gram (short), the float32 Gram (longer). With data-dependent
    # shapes (keras_safe's step without XLA): only the repeated ids' rows summed, in float64.
    vocabulary = 4 if steps < 40 else 50
    ids = RNG.integers(0, vocabulary, (5, steps)).astype("int32")
    ids[0] = 1
    ids[2, steps // 2 :] = 0  # a run of one padding id
    g = RNG.normal(size=(5, steps, 3)).astype("float32")
    g[0, 1] = -g[0, 0] + 1e-3  # a near-cancelling pair on one id
    with embedding_form.data_dependent_shapes(dynamic):
        form = EmbeddingGrad(_variable((vocabulary, 3)), tf.constant(ids), tf.constant(g))
        bound, _ = _bound(form)
    dense = np.zeros((5, vocabulary, 3))
    for b in range(5):
        for t in range(steps):
            dense[b, ids[b, t]] += g[b, t]
    norms = np.linalg.norm(dense.reshape(5, -1), axis=1)
    assert np.all(bound >= norms)
    tight = slice(0, None) if dynamic else slice(1, None)  # float64 sums: the pair too
    assert np.all(bound[tight] <= norms[tight] * (1 + 1e-4))
    factors = RNG.uniform(0, 1, 5).astype("float32")
    got = np.asarray(form.clipped_sum(tf.constant(factors)))
    np.testing.assert_allclose(got, np.einsum("b,bvd->vd", factors, dense), rtol=1e-5, atol=1e-5)
    materialised, _ = form.materialise()
    np.testing.assert_allclose(materialised, dense, rtol=1e-6, atol=1e-6)


def test_repeated_rows_of_an_unknown_batch_and_length():
    # Traced with neither the batch size nor the sequence length known, ids as int64: the
    # same bound as the float64 reference, and an empty batch gives no rows.
    variable = _variable((6, 2))

    @tf.function(
        input_signature=[tf.TensorSpec([None, None], tf.int64)] * 1
        + [tf.TensorSpec([None, None, 2], tf.float32)]
    )
    def bounds(ids, g):
        with embedding_form.data_dependent_shapes():
            return EmbeddingGrad(variable, ids, g).norm_bounds()[0]

    ids = RNG.integers(0, 3, (4, 9))
    g = RNG.normal(size=(4, 9, 2)).astype("float32")
    dense = np.zeros((4, 6, 2))
    for b in range(4):
        np.add.at(dense[b], ids[b], g[b].astype("float64"))
    exact = np.sum(dense.reshape(4, -1) ** 2, axis=1)
    got = np.asarray(bounds(tf.constant(ids), tf.constant(g)))
    assert np.all(got >= exact) and np.all(got <= exact * (1 + 1e-6))
    assert bounds(tf.zeros([0, 9], tf.int64), tf.zeros([0, 9, 2])).shape == (0,)


def test_summed_form_carries_the_rounding_of_its_sum():
    terms = np.zeros((2, 3, 2), "float32")
    terms[0, :, 0] = [1e8, -1e8, 1.0]  # the float32 sum is 0 or 1; the exact sum is 1
    terms[1] = RNG.normal(size=(3, 2))
    form = summed_form(_variable((2,)), tf.constant(terms), [1])
    bound, _ = _bound(form)
    exact = np.linalg.norm(terms.astype("float64").sum(1), axis=1)
    assert np.all(bound >= exact)
    assert bound[1] <= exact[1] * (1 + 1e-5)


def test_group_sums_consecutive_examples():
    a = RNG.normal(size=(6, 2, 3)).astype("float32")
    g = RNG.normal(size=(6, 2, 4)).astype("float32")
    form = OuterProductGrad(_variable((3, 4)), tf.constant(a), tf.constant(g), (3, 4))
    grouped = form.group(3)
    exact = _outer_exact(a, g).reshape(3, 2, 3, 4).sum(1)
    bound, _ = _bound(grouped)
    norms = np.linalg.norm(exact.reshape(3, -1), axis=1)
    assert np.all(bound >= norms) and np.all(bound <= norms * (1 + 1e-4))
    rows = MaterialisedGrad(_variable((3, 4)), tf.constant(_outer_exact(a, g), "float32"))
    per_group, error = rows.group(3).materialise()
    np.testing.assert_allclose(per_group, exact, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(error) >= 0)


def test_merge_joins_outer_products_and_materialises_mixtures():
    variable = _variable((3, 2))
    a1, g1 = RNG.normal(size=(4, 1, 3)), RNG.normal(size=(4, 1, 2))
    a2, g2 = RNG.normal(size=(4, 2, 3)), RNG.normal(size=(4, 2, 2))
    first = OuterProductGrad(
        variable, tf.constant(a1, "float32"), tf.constant(g1, "float32"), (3, 2)
    )
    second = OuterProductGrad(
        variable, tf.constant(a2, "float32"), tf.constant(g2, "float32"), (3, 2)
    )
    exact = _outer_exact(a1, g1) + _outer_exact(a2, g2)
    joined = merge([first, second])
    assert isinstance(joined, OuterProductGrad) and joined.a.shape[1] == 3
    rows = MaterialisedGrad(variable, tf.constant(_outer_exact(a2, g2), "float32"))
    mixed = merge([first, rows])
    assert isinstance(mixed, MaterialisedGrad)
    for form in (joined, mixed):
        bound, _ = _bound(form)
        norms = np.linalg.norm(exact.reshape(4, -1), axis=1)
        assert np.all(bound >= norms * (1 - 1e-7)) and np.all(bound <= norms * (1 + 1e-4))


def test_non_finite_rows_are_dropped_whole():
    per_example = np.ones((3, 2), "float32")
    per_example[1, 0] = np.nan
    form = MaterialisedGrad(_variable((2,)), tf.constant(per_example))
    got = np.asarray(form.clipped_sum(tf.constant([1.0, 0.0, 1.0])))
    np.testing.assert_array_equal(got, [2.0, 2.0])


def test_rounding_helpers():
    assert unit_roundoff("float32") == 2.0**-24
    assert unit_roundoff("bfloat16") == 2.0**-8
    assert float(gamma(3, 0.1)) == pytest.approx(0.3 / 0.7)
    assert np.isinf(float(gamma(10, 0.1)))


@pytest.mark.parametrize("shape", [(4, 250, 400), (4, 1009), (4, 28, 28)])
@pytest.mark.parametrize("scale", ["normal", "spread", "uniform"])
def test_norm_bound_and_sum_sq64_bound_the_float64_norm(scale, shape):
    # Rows of 10^5 values (sums that round many times), of a prime count (no block divisor: one
    # block) and of an MNIST image: the bounds are never below the exact float64 norm and within
    # the rounding they cover.
    if scale == "normal":
        t = RNG.normal(size=shape)
    elif scale == "spread":
        t = RNG.normal(size=shape) * 10.0 ** RNG.uniform(-6, 6, shape)
    else:
        t = 1.0 + 2.0**-12 * RNG.integers(0, 4, shape)  # squares that all round the same way
    t = t.astype("float32")
    axes = tuple(range(1, len(shape)))
    exact = np.sqrt(np.sum(t.astype("float64") ** 2, axis=axes))
    for bound in (
        np.asarray(norm_bound(tf.constant(t), list(axes))),
        np.sqrt(np.asarray(sum_sq64(tf.constant(t)))),
    ):
        assert np.all(bound >= exact)
        assert np.all(bound <= exact * (1 + 2 * gamma(t[0].size, unit_roundoff("float32")) + 1e-6))


def test_sum_sq64_without_a_useful_rounding_bound_is_infinite():
    # A row of n float32 values with no block divisor (one block of n terms) where gamma_n is
    # 1/2 or more: no finite bound holds, so the example must be dropped (factor 0), never get
    # a small bound.
    n = 5_600_000
    while numerics._block(n) != 1 or gamma(n, unit_roundoff("float32")) < 0.5:
        n += 1
    got = np.asarray(sum_sq64(tf.ones([1, n], "float32")))
    assert np.isinf(got).all()
