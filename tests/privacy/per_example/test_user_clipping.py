"""User-level clipping (`examples_per_user=k`): the gradient of each slot's summed loss (one
user's examples, padding rows of weight 0) is clipped as one vector.

The reference computes each user's gradient alone: a `tf.GradientTape` over a forward pass on
that user's rows only, the weighted sum of their losses, the global L2 norm over all variables
in float64, scaled by `min(1, C / norm)` and summed over users in numpy. User-level DP-SGD:
McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models" (one user's
clipped update as the unit); Charles et al. 2024, "Fine-Tuning Large Language Models with
User-Level Differential Privacy".
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import ArgumentError
from keras_safe.privacy.per_example.clipping import clipped_gradient_sum, per_example_forms
from keras_safe.privacy.per_example.forms import OuterProductGrad

K = 3  # rows per slot
# Real rows of each slot: users with 1..K rows, and one empty slot (all padding).
COUNTS = (1, 3, 2, 0, 3, 1)
SLOTS = len(COUNTS)
ROWS = K * SLOTS
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
RELATIVE = 1e-4


def _classifier(inputs, h):
    if len(h.shape) > 2:
        h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _dense():
    inputs = keras.Input((5,))
    return _classifier(inputs, keras.layers.Dense(4, activation="tanh")(inputs))


def _conv():
    inputs = keras.Input((5, 5, 2))
    return _classifier(inputs, keras.layers.Conv2D(3, 2, activation="tanh")(inputs))


def _embedding():
    inputs = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(6, 3)(inputs)  # few ids: rows of a slot share table rows
    return _classifier(inputs, keras.layers.GlobalAveragePooling1D()(h))


def _layer_norm():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4)(inputs)
    return _classifier(inputs, keras.layers.LayerNormalization()(h))


def _lstm():
    inputs = keras.Input((4, 3))
    return _classifier(inputs, keras.layers.LSTM(3)(inputs))


def _transformer():
    """One pre-norm-free transformer block: self-attention and a Dense FFN, each with a residual
    connection and a LayerNormalization."""
    inputs = keras.Input((4, 6))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    h = keras.layers.LayerNormalization()(inputs + attention)
    ffn = keras.layers.Dense(6)(keras.layers.Dense(8, activation="relu")(h))
    h = keras.layers.LayerNormalization()(h + ffn)
    return _classifier(inputs, keras.layers.GlobalAveragePooling1D()(h))


MODELS = {
    "dense": (_dense, lambda rng: rng.normal(size=(ROWS, 5))),
    "conv2d": (_conv, lambda rng: rng.normal(size=(ROWS, 5, 5, 2))),
    "embedding": (_embedding, lambda rng: rng.integers(0, 6, (ROWS, 4)).astype("int32")),
    "layer_norm": (_layer_norm, lambda rng: rng.normal(size=(ROWS, 5))),
    "lstm": (_lstm, lambda rng: rng.normal(size=(ROWS, 4, 3))),
    "transformer": (_transformer, lambda rng: rng.normal(size=(ROWS, 4, 6))),
}


def _batch(name, counts=COUNTS, seed=0):
    """`(model, x, y, w)`: slots of K rows, slot s with `counts[s]` weighted rows first and
    weight-0 padding rows after (the padding rows hold data too, as a sampler's repeats do)."""
    rng = np.random.default_rng(seed)
    build, data = MODELS[name]
    x = data(rng)
    if x.dtype == np.float64:
        x = x.astype("float32")
    y = rng.integers(0, 3, len(x))
    w = np.zeros(len(x), "float32")
    for slot, count in enumerate(counts):
        w[slot * K : slot * K + count] = rng.uniform(0.5, 2.0, count)
    return build(), x, y, w


def _user_gradients(model, x, y, w, counts=COUNTS):
    """Per non-empty slot, the float64 gradient of the user's weighted summed loss, each on a
    forward pass over that user's rows alone."""
    grads = []
    for slot, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(slot * K, slot * K + count)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(LOSS(y[rows], model(x[rows], training=True)) * w[rows])
        per_variable = tape.gradient(loss, model.trainable_variables)
        grads.append(
            [
                np.zeros(v.shape) if g is None else np.asarray(tf.convert_to_tensor(g), "float64")
                for g, v in zip(per_variable, model.trainable_variables)
            ]
        )
    return grads


def _norm(grads):
    return float(np.sqrt(sum(np.sum(np.square(g)) for g in grads)))


def _reference_sum(grads, clip):
    total = [np.zeros_like(g) for g in grads[0]]
    for user in grads:
        factor = min(1.0, clip / _norm(user))
        total = [t + factor * g for t, g in zip(total, user)]
    return total


def _clipped(model, x, y, w, clip, per_user=K, traced=False):
    def forward():
        pred = model(x, training=True)
        return LOSS(y, pred) * w, pred

    def run(c):
        return clipped_gradient_sum(
            model, model.trainable_variables, forward, c, examples_per_user=per_user
        )

    if traced:
        run = tf.function(run, autograph=False)
    sums, _, _, norms = run(tf.constant(clip, tf.float32))
    return [np.asarray(s, "float64") for s in sums], np.asarray(norms)


def _assert_close(actual, expected, what):
    scale = _norm(expected)
    for a, e in zip(actual, expected):
        error = float(np.sqrt(np.sum(np.square(a - e))))
        assert error <= RELATIVE * scale, f"{what}: off by {error:.3g} of {scale:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_matches_one_user_at_a_time(name):
    model, x, y, w = _batch(name)
    grads = _user_gradients(model, x, y, w)
    norms = np.array([_norm(g) for g in grads])
    # Most users clipped at the low bound; some users unclipped at the high one.
    low, high = np.quantile(norms, 0.2), np.quantile(norms, 0.8)
    assert np.sum(norms > low) >= 3 and np.sum(norms < high) >= 3
    for clip in (low, high):
        expected = _reference_sum(grads, clip)
        for traced in (False, True):
            sums, slot_norms = _clipped(model, x, y, w, clip, traced=traced)
            _assert_close(sums, expected, f"{name}, C={clip:.3g}, traced={traced}")
    # The norms are per slot, upper bounds tight to the users' norms (0 for the empty slot).
    filled = np.array(COUNTS) > 0
    assert slot_norms.shape == (SLOTS,)
    np.testing.assert_allclose(slot_norms[filled], norms, rtol=1e-5)
    assert np.all(slot_norms[filled] >= norms * (1 - 1e-6))
    np.testing.assert_allclose(slot_norms[~filled], 0.0, atol=1e-6)


def test_a_slot_is_clipped_as_one_vector_not_per_example():
    """One user of K identical rows: their slot adds exactly C to the sum (per-example
    clipping would add K C)."""
    model, x, y, w = _batch("dense", counts=(K,))
    x, y, w = x[:K], y[:K], np.ones(K, "float32")
    x[1:], y[1:] = x[0], y[0]
    clip = 0.1 * _norm(_user_gradients(model, x, y, w, counts=(K,))[0])
    sums, _ = _clipped(model, x, y, w, clip)
    np.testing.assert_allclose(_norm(sums), clip, rtol=1e-5)
    sums, _ = _clipped(model, x, y, w, clip, per_user=None)
    np.testing.assert_allclose(_norm(sums), K * clip, rtol=1e-5)


def _removal_moves(model, x, y, w, clip, per_user):
    """The largest `||S - S_without_u||` over the users u, each removed by setting their rows'
    weights to 0, and by deleting their slot's rows from the batch."""
    whole, _ = _clipped(model, x, y, w, clip, per_user=per_user)
    moves = []
    for slot, count in enumerate(COUNTS):
        if count == 0:
            continue
        rows = np.arange(slot * K, (slot + 1) * K)
        zeroed = w.copy()
        zeroed[rows] = 0.0
        without, _ = _clipped(model, x, y, zeroed, clip, per_user=per_user)
        moves.append(_norm([a - b for a, b in zip(whole, without)]))
        if per_user is not None:
            keep = np.setdiff1d(np.arange(ROWS), rows)
            deleted, _ = _clipped(model, x[keep], y[keep], w[keep], clip, per_user=per_user)
            moves.append(_norm([a - b for a, b in zip(whole, deleted)]))
    return max(moves)


@pytest.mark.parametrize("name", ["dense", "transformer"])
def test_removing_one_user_moves_the_sum_by_at_most_the_clip_norm(name):
    model, x, y, w = _batch(name)
    # The user of the second slot has K copies of one example: their gradients add up.
    x[K + 1 : 2 * K], y[K + 1 : 2 * K], w[K : 2 * K] = x[K], y[K], 1.0
    norms = [_norm(g) for g in _user_gradients(model, x, y, w)]
    clip = 0.2 * min(norms)  # every user clipped, so the bound is reached
    user_level = _removal_moves(model, x, y, w, clip, per_user=K)
    assert user_level <= clip * (1 + 1e-5)
    assert user_level >= clip * (1 - 1e-4)  # tight: the removed user's clipped gradient
    # Per-example clipping of the same batch: each of the user's K rows is clipped to C on its
    # own, so removing the user moves the sum by up to K C (here the K copies: K C).
    example_level = _removal_moves(model, x, y, w, clip, per_user=None)
    assert example_level > 2 * clip


def test_dense_slot_norms_stay_in_factored_form():
    """The Dense kernels' user gradients keep the outer-product (Gram) form, grouped by slot:
    `[slots, K, inputs]` activations, not a materialised `[slots, inputs, outputs]`."""
    model, x, y, w = _batch("dense")

    def forward():
        pred = model(x, training=True)
        return LOSS(y, pred) * w, pred

    result = per_example_forms(model, model.trainable_variables, forward, examples_per_user=K)
    kernels = [f for f, v in zip(result.forms, model.trainable_variables) if len(v.shape) == 2]
    assert len(kernels) == 2
    for form in kernels:
        assert isinstance(form, OuterProductGrad)
        assert form.a.shape[1] == K and form.g.shape[1] == K
        assert int(tf.shape(form.a)[0]) == SLOTS


def test_a_batch_of_partial_slots_is_refused_with_the_argument_named():
    model, x, y, w = _batch("dense")
    with pytest.raises(ArgumentError, match="examples_per_user"):
        _clipped(model, x[:-1], y[:-1], w[:-1], 1.0)


def test_examples_per_user_with_microbatches_is_refused():
    model, x, y, w = _batch("dense")

    def forward():
        pred = model(x, training=True)
        return LOSS(y, pred) * w, pred

    with pytest.raises(ArgumentError, match="num_microbatches"):
        clipped_gradient_sum(
            model, model.trainable_variables, forward, 1.0, num_microbatches=2, examples_per_user=K
        )
