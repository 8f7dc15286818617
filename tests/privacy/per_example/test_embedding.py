"""Embedding rule: repeated ids, masks, tied tables."""

import keras
import numpy as np
import pytest

from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
)


@pytest.mark.parametrize("xla", [False, True], ids=["repeated_rows", "xla_gram"])
def test_repeated_tokens(xla):
    # Without XLA the step sums only the repeated ids' rows (shapes that depend on the data);
    # XLA compiles the Gram form instead.
    model = classifier(
        [keras.layers.Embedding(5, 4), keras.layers.GlobalAveragePooling1D()], (7,), "int32"
    )
    assert_fit_matches_reference(model, RNG.integers(0, 5, (B, 7)), labels(), xla=xla)


@pytest.mark.parametrize("length", [3, 12], ids=["gram", "rows_per_id"])
def test_both_norm_methods(length):
    # Short sequences take the float64 Gram form, long ones the rows summed per (example, id).
    ids = RNG.integers(0, 4, (B, length))
    ids[0] = 2  # one example repeats a single id everywhere
    model = classifier([keras.layers.Embedding(4, 3)], (length,), "int32")
    check = check_with_oracle(model, ids, labels())
    assert check.fallback is None


def test_masked_sequence_outputs():
    ids = RNG.integers(1, 6, (B, 6))
    ids[:, 4:] = 0  # padding, masked by the Embedding
    ids[0, 2:] = 0
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(6, 4, mask_zero=True)(inputs)
    h = keras.layers.LSTM(3, return_sequences=True)(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    y = RNG.integers(0, 2, (B, 6))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert_fit_matches_reference(model, ids, y, loss=loss)


def test_tied_embedding_used_as_output_projection():
    class Tied(keras.Model):
        def __init__(self):
            super().__init__()
            self.embedding = keras.layers.Embedding(5, 3)
            self.hidden = keras.layers.Dense(3, activation="tanh")

        def call(self, ids):
            h = self.hidden(keras.ops.mean(self.embedding(ids), axis=1))
            return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))

    x = RNG.integers(0, 5, (B, 4))
    assert_fit_matches_reference(Tied(), x, np.asarray(RNG.integers(0, 5, B)))
