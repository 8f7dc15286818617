"""Per-example norms are never underestimated, even where float32 sums cancel.

0.1.0 computed the Gram ("ghost") norm of a Dense on sequences, `sum_{t,s} (a_t.a_s)(g_t.g_s)`,
in float32: for an example crafted so that its large terms cancel, the computed norm was 0
while the true norm was 1.2e4, and one DP step moved the weights by 1.2e4 where the bound is
lr * C = 1. The norms are now rigorous upper bounds; these tests attack them through the public
API and measure the update.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe.privacy.per_example.clipping import clipped_gradient_sum

LR, CLIP = 1.0, 1.0


def _one_dp_step(model, x, y, loss="mse"):
    """The weight update of one DP step (noise 0) on one example, and its global norm."""
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(LR, l2_norm_clip=CLIP, noise_multiplier=0.0),
        loss=loss,
    )
    keras_safe.privacy.make_private(model)
    before = [np.array(v, "float64") for v in model.trainable_variables]
    model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0)
    after = [np.array(v, "float64") for v in model.trainable_variables]
    return np.sqrt(sum(np.sum((b - a) ** 2) for b, a in zip(before, after)))


def _cancelling_pair(width, big, small, rng):
    """Two rows `a_1 = big * v`, `a_2 = -big * v + d` (float32): `a_1 + a_2 = d`, |d| = small."""
    v = rng.normal(size=width)
    v /= np.linalg.norm(v)
    d = rng.normal(size=width)
    d *= small / np.linalg.norm(d)
    first = (big * v).astype("float32")
    return np.stack([first, (-big * v + d).astype("float32")])


def _linear_loss(y_true, y_pred):
    # Linear in the output: every position's output gradient is y_true / 2 (mean pooling).
    return keras.ops.sum(y_true * y_pred, axis=-1)


@pytest.mark.parametrize("width", [16, 4], ids=["gram_form", "outer_product_form"])
def test_dense_on_a_crafted_sequence_moves_the_weights_by_at_most_lr_c(width):
    # Both positions get the output gradient g = 0.01: the example's kernel gradient is
    # (a_1 + a_2) g^T = d g^T, of norm 1e4 * 0.01 * sqrt(width), while each Gram term is ~1e16
    # and 0.1.0's float32 Gram sum came out as exactly 0 (so the example was not clipped).
    rng = np.random.default_rng(0)
    x = _cancelling_pair(width, 1e8, 1e4, rng)[None]
    exact = np.linalg.norm(x[0, 0].astype("float64") + x[0, 1].astype("float64"))
    assert exact * 0.01 > 10 * CLIP  # the example's true gradient is far above the clip bound
    model = keras.Sequential(
        [
            keras.Input((2, width)),
            keras.layers.Dense(width, use_bias=False),
            keras.layers.GlobalAveragePooling1D(),
        ]
    )
    moved = _one_dp_step(model, x, np.full((1, width), 0.02, "float32"), loss=_linear_loss)
    assert moved <= LR * CLIP * (1 + 1e-5)
    assert moved >= 0.9 * LR * CLIP  # clipped to (about) the bound, not dropped


@pytest.mark.parametrize("length", [2, 12], ids=["gram_form", "rows_per_id"])
def test_embedding_with_crafted_cancelling_rows(length):
    # The same id at two positions, whose gradients are s_1 h and s_2 h with s_1 + s_2 small.
    ids = np.full((1, length), 3, "int32")
    scales = np.zeros((1, length), "float32")
    scales[0, :2] = [1e8, -1e8 + 1e4]
    token, scale = keras.Input((length,), dtype="int32"), keras.Input((length,))
    rows = keras.layers.Embedding(5, 8)(token)
    pooled = keras.ops.sum(rows * scale[..., None], axis=1)
    model = keras.Model([token, scale], keras.layers.Dense(1, use_bias=False)(pooled))
    moved = _one_dp_step(model, [ids, scales], np.zeros((1, 1), "float32"))
    assert moved <= LR * CLIP * (1 + 1e-5)
    assert moved >= 0.9 * LR * CLIP


def test_a_sequence_bias_with_cancelling_gradients():
    # The bias gradient sum_t g_t cancels: 1e8 - 1e8 + 1e4 at one output.
    x = np.zeros((1, 3, 1), "float32")
    weights = np.array([1e8, -1e8 + 1e4, 0.0], "float32")
    inputs, w = keras.Input((3, 1)), keras.Input((3,))
    h = keras.layers.Dense(1, bias_initializer="ones")(inputs)[..., 0]
    model = keras.Model([inputs, w], keras.ops.sum(h * w, axis=1, keepdims=True))
    moved = _one_dp_step(model, [x, weights[None]], np.zeros((1, 1), "float32"))
    assert moved <= LR * CLIP * (1 + 1e-5)
    assert moved >= 0.9 * LR * CLIP


def test_mixed_bfloat16_keeps_every_example_and_the_bound():
    # bfloat16 factors summed in bfloat16 would have no useful rounding bound (gamma_n is
    # infinite for n >= 128 at u = 2^-8) and every example would be dropped; the forms work
    # in float32 on the recorded values.
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = keras.Sequential(
            [
                keras.Input((16, 16, 1)),
                keras.layers.Conv2D(4, 3, padding="same"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, dtype="float32"),
            ]
        )
        variables = model.trainable_variables
        x = np.random.default_rng(1).normal(size=(4, 16, 16, 1)).astype("float32")
        y = np.array([0, 1, 2, 1])

        @tf.function
        def clipped(xb, yb):
            def forward():
                pred = model(xb, training=True)
                loss = keras.losses.sparse_categorical_crossentropy(yb, pred, from_logits=True)
                return loss, pred

            sums, _, _, norms = clipped_gradient_sum(model, variables, forward, CLIP)
            return sums, norms

        full, norms = clipped(x, y)
        assert np.all(np.isfinite(norms)) and np.all(np.asarray(norms) > 0)
        for i in range(4):
            keep = [j for j in range(4) if j != i]
            without, _ = clipped(x[keep], y[keep])
            moved = np.sqrt(
                sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(full, without))
            )
            assert moved <= CLIP * (1 + 1e-5)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
