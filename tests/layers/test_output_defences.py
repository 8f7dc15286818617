"""Output defences keep the predicted class, compute what their docstrings say, and load."""

import keras
import numpy as np
import pytest

from keras_safe._validation import ArgumentError
from keras_safe.layers import LabelOnly, PredictionRounding, ReverseSigmoid, TopKOnly
from tests.testing import assert_config_round_trip, assert_saves_in_fresh_process

DEFENCES = [
    lambda: PredictionRounding(decimals=0),
    lambda: PredictionRounding(decimals=1),
    lambda: PredictionRounding(decimals=3),
    lambda: TopKOnly(k=1),
    lambda: TopKOnly(k=2, renormalize=True),
    lambda: LabelOnly(one_hot=True),
    lambda: ReverseSigmoid(beta=1.0, gamma=0.1),
    lambda: ReverseSigmoid(beta=3.0, gamma=5.0),  # strong: would reorder classes unguarded
    lambda: ReverseSigmoid(beta=0.5, gamma=1.0),
]


def _probabilities(rng, n, classes, temperature):
    z = rng.normal(size=(n, classes)) * temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype("float32")


def _batches():
    rng = np.random.default_rng(0)
    out = [_probabilities(rng, 2000, k, t) for k in (2, 3, 10, 40) for t in (0.05, 1.0, 8.0)]
    # Exact ties: the arg-max is the first of the tied classes.
    ties = np.array([[0.5, 0.5]], "float32")
    exact = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.45, 0.45, 0.0]], "float32")
    return out + [ties, exact]


@pytest.mark.parametrize("make", DEFENCES)
def test_every_defence_keeps_the_arg_max(make):
    for p in _batches():
        out = np.asarray(make()(p))
        np.testing.assert_array_equal(out.argmax(axis=1), p.argmax(axis=1))


def test_label_only_returns_the_arg_max():
    p = _batches()[7]
    np.testing.assert_array_equal(np.asarray(LabelOnly()(p)), p.argmax(axis=1))
    assert np.asarray(LabelOnly()(p)).dtype == np.int32
    np.testing.assert_array_equal(
        np.asarray(LabelOnly(one_hot=True)(p)), np.eye(p.shape[1])[p.argmax(1)]
    )


def test_rounding_is_on_the_grid_and_within_half_a_unit():
    p = _batches()[4]
    for decimals in (1, 2):
        out = np.asarray(PredictionRounding(decimals)(p), np.float64)
        scaled = out * 10**decimals
        np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-3)
        # Every value is p rounded, except where the cap kept a class below the top.
        rounded = np.round(p.astype(np.float64), decimals)
        capped = ~np.isclose(out, rounded, atol=1e-6)
        top = np.eye(p.shape[1], dtype=bool)[p.argmax(1)]
        assert np.all(out[capped & ~top] < rounded[capped & ~top])
        assert np.mean(capped) < 0.05


def test_top_k_keeps_the_k_largest_and_zeros_the_rest():
    p = _batches()[7]
    out = np.asarray(TopKOnly(k=3)(p))
    order = np.argsort(-p, axis=1, kind="stable")[:, :3]
    kept = np.zeros_like(p, dtype=bool)
    np.put_along_axis(kept, order, True, axis=1)
    np.testing.assert_array_equal(out[kept], p[kept])
    assert np.all(out[~kept] == 0)
    renormalized = np.asarray(TopKOnly(k=3, renormalize=True)(p))
    np.testing.assert_allclose(renormalized.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(renormalized, out / out.sum(axis=1, keepdims=True), rtol=1e-5)


def test_reverse_sigmoid_follows_lee_et_al():
    p = _batches()[7]
    beta, gamma = 0.7, 0.4
    out = np.asarray(ReverseSigmoid(beta=beta, gamma=gamma)(p), np.float64)
    # y - beta * (sigmoid(gamma * logit(y)) - 1/2), clipped at 0 and normalised (their eq. 4).
    y = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    r = beta * (1 / (1 + np.exp(-gamma * np.log(y / (1 - y)))) - 0.5)
    want = np.maximum(p - r, 0)
    want /= want.sum(axis=1, keepdims=True)
    same_top = want.argmax(1) == p.argmax(1)
    assert same_top.mean() > 0.5
    np.testing.assert_allclose(out[same_top], want[same_top], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    # Where the formula moved the top class, the two values were exchanged.
    moved = ~same_top
    np.testing.assert_allclose(np.sort(out[moved], axis=1), np.sort(want[moved], axis=1), atol=1e-5)


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: PredictionRounding(decimals=-1), "decimals"),
        (lambda: PredictionRounding(decimals=1.5), "decimals"),
        (lambda: TopKOnly(k=0), "k"),
        (lambda: ReverseSigmoid(beta=0.0), "beta"),
        (lambda: ReverseSigmoid(gamma=-1.0), "gamma"),
    ],
)
def test_bad_settings_name_the_argument(make, argument):
    with pytest.raises(ArgumentError, match=f"`{argument}`.*Fix:"):
        make()


def test_bad_inputs_are_refused():
    with pytest.raises(ArgumentError, match="`k`"):
        TopKOnly(k=4)(np.full((2, 3), 1 / 3, "float32"))
    with pytest.raises(ArgumentError, match="`inputs`.*Fix:"):
        PredictionRounding()(np.full((2, 1), 0.7, "float32"))


def test_config_round_trip():
    for make in DEFENCES + [lambda: LabelOnly()]:
        assert_config_round_trip(make())


def test_serving_models_load_in_a_fresh_process():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="softmax")])
    cases = []
    for make in DEFENCES[1::2] + [lambda: LabelOnly()]:
        served = keras.Sequential([keras.Input((6,)), base, make()])
        out = np.asarray(served.predict(x, verbose=0))
        if out.ndim == 2:
            np.testing.assert_array_equal(out.argmax(1), base.predict(x, verbose=0).argmax(1))
        cases.append((served, x))
    assert_saves_in_fresh_process(cases)
