"""Recurrent cell rules: SimpleRNN, LSTM, GRU, unrolled and tapped at every step."""

import keras
import pytest

import keras_safe
from tests.privacy.per_example.common import (
    RNG,
    B,
    assert_fit_matches_reference,
    check_with_oracle,
    classifier,
    labels,
)


@pytest.mark.parametrize(
    "layer",
    [lambda: keras.layers.LSTM(4), lambda: keras.layers.GRU(3, return_sequences=True)],
    ids=["lstm", "gru_sequences"],
)
def test_fit_step_matches_one_example_loop(layer):
    model = classifier([layer()], (5, 3))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5, 3)), labels())


@pytest.mark.parametrize(
    "layer",
    [lambda: keras.layers.LSTM(4), lambda: keras.layers.GRU(3), lambda: keras.layers.SimpleRNN(3)],
    ids=["lstm", "gru", "simple_rnn"],
)
def test_recurrent_layers_use_cell_rules_not_the_jacobian(layer, monkeypatch):
    def no_jacobian(*args, **kwargs):
        raise AssertionError("the per-example Jacobian should not be needed")

    monkeypatch.setattr(keras_safe.privacy.per_example.clipping, "jacobian", no_jacobian)
    model = classifier([layer()], (5, 3))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 5, 3)), labels())


def test_bidirectional_and_backwards():
    layers = [
        keras.layers.Bidirectional(keras.layers.GRU(2, return_sequences=True)),
        keras.layers.SimpleRNN(2, go_backwards=True),
    ]
    check = check_with_oracle(classifier(layers, (4, 3)), RNG.normal(size=(B, 4, 3)), labels())
    assert check.fallback is None


def test_dense_inside_a_recurrent_cell():
    class Cell(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.state_size = 4
            self.dense = keras.layers.Dense(4, activation="tanh")

        def build(self, input_shape):
            self.dense.build((None, input_shape[-1] + 4))

        def call(self, inputs, states):
            h = self.dense(keras.ops.concatenate([inputs, states[0]], axis=-1))
            return h, [h]

    model = classifier([keras.layers.RNN(Cell())], (3, 2))
    assert_fit_matches_reference(model, RNG.normal(size=(B, 3, 2)), labels())
