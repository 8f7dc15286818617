"""Side channels of the forward pass: state written, data sent out, values laundered.

Each layer below is an attack that keeps every example's gradient row-wise in the eyes of a
value-only analysis, yet lets one example reach the others, the model's state or the outside
world in training. The first part of each test shows the channel is real (a plain training
call moves the state or the output the way the attack intends); then a private model with the
layer is refused at its first step, with nothing applied, written or charged.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import dp_gradients, get_ledger, make_private

L = keras.layers
RNG = np.random.default_rng(26)
N, B = 64, 8
X = RNG.normal(size=(B, 4)).astype("float32")
Y = RNG.normal(size=(B, 1)).astype("float32")


def _private(layer):
    model = keras.Sequential([keras.Input((4,)), layer, L.Dense(1)])
    model.compile(
        optimizer=DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1, num_examples=N,
            batch_size=B,
        ),
        loss="mse",
    )  # fmt: skip
    return make_private(model)


def _refused(layer, match):
    model = _private(layer)
    before = [np.array(v) for v in model.weights]
    with pytest.raises(PrivacyError, match=match):
        dp_gradients(model, X, Y)
    for b, v in zip(before, model.weights):
        np.testing.assert_array_equal(b, np.array(v), err_msg=v.path)
    assert get_ledger(model).steps == 0
    return model


class TableMix(L.Layer):
    """Writes each row into a hash table under one key and reads it back: the last row wins,
    and the table keeps it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.float32, 0.0)

    def call(self, x, training=False):
        if not training:
            return x
        keys = tf.zeros_like(tf.cast(x[:, 0], tf.int64))
        self.table.insert(keys, x[:, 0])
        return x + 10.0 * tf.reshape(self.table.lookup(keys), tf.shape(keys))[:, None]


def test_a_hash_table_written_from_the_data_is_refused():
    layer = TableMix()
    out = layer(tf.constant(X), training=True)  # the channel: every row reads the last one
    np.testing.assert_allclose(np.array(out)[0, 0], X[0, 0] + 10.0 * X[-1, 0], rtol=1e-5)
    _refused(TableMix(), "LookupTableInsertV2")


class GeneratorSkip(L.Layer):
    """Advances a random generator by an amount read from the data: its state encodes it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generator = tf.random.Generator.from_seed(0)

    def call(self, x, training=False):
        if training:
            self.generator.skip(tf.cast(tf.round(tf.abs(x[0, 0]) * 1e6), tf.int64))
        return x


def test_a_generator_moved_by_the_data_is_refused():
    layer = GeneratorSkip()
    start = np.array(layer.generator.state)
    layer(tf.constant(X), training=True)
    moved = int(np.array(layer.generator.state)[0] - start[0])
    assert moved > 0 and moved % round(abs(float(X[0, 0])) * 1e6) == 0  # the data, in the state
    model = _refused(GeneratorSkip(), "RngReadAndSkip")
    assert model is not None


class BranchWrites(L.Layer):
    """Writes constants, but in a loop and a branch the data chose: the variables then hold
    example 0's first feature (times 1000) and whether any feature exceeds 2."""

    def build(self, shape):
        self.count = self.add_weight(shape=(), initializer="zeros", trainable=False)
        self.bit = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if training:
            n = tf.cast(tf.round(tf.abs(x[0, 0]) * 1000.0), tf.int32)

            def body(i):
                self.count.assign_add(1.0)
                return (i + 1,)

            tf.while_loop(lambda i: i < n, body, (tf.constant(0),))
            tf.cond(
                tf.reduce_max(x) > 2.0, lambda: self.bit.assign(1.0), lambda: self.bit.assign(0.0)
            )
        return x


def test_constant_writes_under_a_loop_or_branch_the_data_chose_are_refused():
    layer = BranchWrites()
    layer(tf.constant(X), training=True)
    assert float(layer.count) == round(abs(float(X[0, 0])) * 1000.0)
    _refused(BranchWrites(), "under a branch or loop the data chose")


class Printed(L.Layer):
    """Sends the batch out of the graph (to a file) in training."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.file = path

    def call(self, x, training=False):
        if training:
            with tf.control_dependencies([tf.print(x, output_stream="file://" + self.file)]):
                return tf.identity(x)
        return x


def test_data_printed_out_of_the_step_is_refused(tmp_path):
    path = str(tmp_path / "leak.txt")
    Printed(path)(tf.constant(X), training=True)
    assert os.path.getsize(path) > 0
    os.remove(path)
    _refused(Printed(path), "PrintV2")
    assert not os.path.exists(path)


class Laundered(L.Layer):
    """The batch mean formatted into a string and parsed back: a value through strings."""

    def call(self, x, training=False):
        if not training:
            return x
        text = tf.strings.format("{}", tf.reduce_mean(x, axis=0), summarize=-1)
        text = tf.strings.regex_replace(
            tf.strings.substr(text, 1, tf.strings.length(text) - 2), " +", " "
        )
        mean = tf.strings.to_number(tf.strings.split(tf.strings.strip(text), " "))
        return x - 50.0 * tf.ensure_shape(tf.reshape(mean, [4]), [4])


def test_a_batch_value_laundered_through_strings_is_refused():
    out = np.array(Laundered()(tf.constant(X), training=True))
    np.testing.assert_allclose(out, X - 50.0 * X.mean(0), atol=1e-3)
    _refused(Laundered(), "StringFormat|StringToNumber|examples of a batch stay apart")


class FakeQuant(L.Layer):
    """Quantisation whose range is the largest |value| of the whole batch."""

    def call(self, x, training=False):
        if not training:
            return x
        return tf.raw_ops.QuantizeAndDequantizeV2(
            input=x, input_min=0.0, input_max=0.0, signed_input=True, num_bits=3,
            range_given=False,
        )  # fmt: skip


def test_quantisation_ranged_on_the_batch_is_refused():
    layer = FakeQuant()
    small = np.array(layer(tf.constant(X), training=True))
    big = X.copy()
    big[0] *= 40.0  # example 0 sets the range of every other example
    moved = np.array(layer(tf.constant(big), training=True))
    assert np.abs(moved[1:] - small[1:]).max() > 0.1
    _refused(FakeQuant(), "QuantizeAndDequantizeV2")
