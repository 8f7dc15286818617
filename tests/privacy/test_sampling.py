"""Poisson sampling: what a private `fit` on arrays trains on; the one definition of an epoch."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe.accounting import DPSchedule
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private, poisson_batches
from keras_safe.privacy.sampling import epoch_batches, poisson_info


class Rows(keras.metrics.Metric):
    """The examples (rows of positive weight) the steps of an epoch trained on."""

    def __init__(self, name="rows", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            rows = tf.cast(tf.shape(y_true)[0], "float32")
        else:
            rows = tf.reduce_sum(tf.cast(tf.reshape(sample_weight, [-1]) > 0, "float32"))
        self.total.assign_add(rows)

    def result(self):
        return self.total


def _model(**dp):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=DPSGD(1e-3, l2_norm_clip=1.0, noise_multiplier=1.0, **dp),
        loss="sparse_categorical_crossentropy",
        metrics=[Rows()],
    )
    return make_private(model)


def _data(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def test_a_private_fit_on_arrays_samples_fresh_poisson_batches_every_epoch():
    n, batch, epochs = 200, 20, 8
    x, y = _data(n)
    model = _model()
    rows = np.array(model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0).history["rows"])
    # 10 steps per epoch, each a Binomial(200, 0.1) sample: an epoch holds 200 +- 13.4.
    sd = math.sqrt(10 * n * 0.1 * 0.9)
    assert np.all(np.abs(rows - 200) < 6 * sd), rows
    assert abs(rows.mean() - 200) < 5 * sd / math.sqrt(epochs), rows
    assert len(set(rows.tolist())) > 1, rows  # not the same sample every epoch
    ledger = get_ledger(model)
    assert ledger.steps == epochs * 10 and ledger.segments()[0]["rows"] == rows.sum()
    # The fixed-size opt-in trains on every example exactly once per epoch.
    fixed = _model(sampling="shuffle")
    rows = fixed.fit(x, y, batch_size=batch, epochs=3, verbose=0).history["rows"]
    assert rows == [200.0] * 3 and get_ledger(fixed).segments()[0]["shuffled"]


def test_validation_split_and_class_weight_carry_over_to_the_poisson_batches():
    x, _ = _data(200)
    y = np.ones(200, "int32")
    y[:10] = 0  # ten examples of class 0 in the training part, the rest class 1 (weight 0)
    model = _model()
    history = model.fit(
        x, y, batch_size=30, epochs=2, validation_split=0.25, class_weight={0: 1.0, 1: 0.0},
        verbose=0,
    )  # fmt: skip
    # Keras's split: the last quarter validates; the Poisson batches sample the 150 others
    # (rate 0.2, 5 steps an epoch), with the class weights as sample weights: the step counts
    # only class 0, 10 * 0.2 * 10 = 20 examples in 10 steps on average (sd 4), 300 without them.
    assert "val_loss" in history.history
    (segment,) = get_ledger(model).segments()
    assert segment["num_examples"] == 150 and segment["sampling_rate"] == pytest.approx(0.2)
    assert segment["steps"] == 2 * 5 and 0 < segment["rows"] < 60, segment


@pytest.mark.parametrize("n, batch, epochs", [(1797, 64, 3), (100, 7, 2.5), (50, 50, 1)])
def test_poisson_batches_run_the_steps_of_the_one_epoch_rule(n, batch, epochs):
    x, y = _data(n)
    data = poisson_batches(x, y, batch_size=batch, epochs=epochs)
    steps = sum(1 for _ in data)
    schedule, planned = DPSchedule.from_arguments(n, batch, epochs)
    assert steps == planned == math.ceil(epochs * math.ceil(n / batch) - 1e-9)
    assert poisson_info(data).steps == steps == int(data.cardinality())


def test_fit_batches_are_not_padded_and_come_without_weights_unless_needed():
    x, y = _data(300)
    plain = epoch_batches(x, y, batch_size=30, pad_to_multiple_of=1)
    sizes = [int(xb.shape[0]) for xb, _ in plain]  # (x, y) pairs, as Keras's own batches
    assert len(sizes) == 10 and len(set(sizes)) > 1
    weighted = epoch_batches(x, y, np.ones(300), batch_size=30, pad_to_multiple_of=4)
    for _, _, wb in weighted:
        assert int(wb.shape[0]) % 4 == 0 and int(wb.shape[0]) - np.sum(wb.numpy() > 0) < 4


def test_non_finite_examples_are_counted_among_the_real_rows_only():
    # Fixed-shape Poisson batches pad with copies of example 0 (weight 0): when example 0 is
    # NaN, only its real appearances are dropped examples.
    n, batch = 300, 30
    x, y = _data(n)
    x[0] = np.nan
    x[5] = np.nan
    data = poisson_batches(x, y, batch_size=batch, epochs=3, seed=11)
    expected = 0
    for xb, _, wb in data:
        real = wb.numpy() > 0
        expected += int(np.sum(np.isnan(xb.numpy()[real, 0])))
    model = _model()
    with pytest.warns(UserWarning, match="dropped"):
        history = model.fit(data, verbose=0)
    assert history.history["nonfinite_examples"] == [expected]
    assert get_ledger(model).nonfinite_examples == expected


def test_the_notebooks_accounting_names_still_reach_keras_safe_accounting():
    # keras_safe 0.2.0 exported these from keras_safe.privacy; they stay reachable there.
    for name in ("compute_epsilon", "privacy_statement"):
        assert getattr(keras_safe.privacy, name) is getattr(keras_safe.accounting, name)
        assert name not in keras_safe.privacy.__all__
