"""Tests for keras_safe.callbacks.GradientMonitor."""

import csv
import math
import warnings

import keras
import numpy as np
import pytest

from keras_safe.callbacks import GradientMonitor
from keras_safe.optimizers import GradientClip
from tests.testing import assert_config_round_trip

BATCH = 8


def _data(n=32, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (scale * rng.normal(size=(n, 2))).astype("float32")
    return x, y


def _model(optimizer="sgd", out_initializer="glorot_uniform"):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(2, name="out", kernel_initializer=out_initializer),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _numpy_layer_norms(weights, x, y):
    """Per-layer gradient norms of the mean squared error of the linear model, by hand."""
    w1, b1, w2, b2 = [w.astype(np.float64) for w in weights]
    h = x.astype(np.float64) @ w1 + b1
    out = h @ w2 + b2
    d_out = 2.0 * (out - y.astype(np.float64)) / out.size
    d_h = d_out @ w2.T
    hidden = math.sqrt(np.sum((x.T @ d_h) ** 2) + np.sum(d_h.sum(0) ** 2))
    last = math.sqrt(np.sum((h.T @ d_out) ** 2) + np.sum(d_out.sum(0) ** 2))
    return {"hidden": hidden, "out": last}


def _monitor_warnings(record):
    return [str(w.message) for w in record if "GradientMonitor" in str(w.message)]


def test_fixed_batch_norms_match_numpy_and_reach_history():
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.05))
    monitor = GradientMonitor(x[:10], y[:10])
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor])
    expected = _numpy_layer_norms(model.get_weights(), x[:10], y[:10])
    for layer, norm in expected.items():
        assert len(history.history[f"grad_norm/{layer}"]) == 2
        np.testing.assert_allclose(history.history[f"grad_norm/{layer}"][-1], norm, rtol=1e-4)
        np.testing.assert_allclose(monitor.norms[layer][-1], norm, rtol=1e-4)
    assert monitor.alerts == []


def test_last_batch_norms_and_clip_statistics_come_from_gradient_clip(tmp_path):
    x, y = _data(n=24, scale=20.0)
    weights_before_last_step = {}

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            weights_before_last_step["w"] = [w.copy() for w in self.model.get_weights()]

    optimizer = GradientClip(keras.optimizers.SGD(0.01), clip_norm=5.0)
    model = _model(optimizer)
    csv_path = str(tmp_path / "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[Recorder(), GradientMonitor(), keras.callbacks.CSVLogger(csv_path)],
    )
    expected = _numpy_layer_norms(weights_before_last_step["w"], x[-BATCH:], y[-BATCH:])
    for layer, norm in expected.items():
        np.testing.assert_allclose(history.history[f"grad_norm/{layer}"][0], norm, rtol=1e-4)
    # GradientClip's figures, copied into the logs: the global norm of the last step.
    np.testing.assert_allclose(
        history.history["grad_norm"][0], math.hypot(*expected.values()), rtol=1e-4
    )
    assert history.history["clip_fraction"][0] == 1.0  # every norm here is far above 5
    assert history.history["skipped_steps"][0] == 0
    with open(csv_path) as f:
        header = next(csv.reader(f))
    assert {"clip_fraction", "grad_norm", "skipped_steps", "grad_norm/hidden"} <= set(header)


def test_warns_about_vanishing_layers_by_name():
    x, y = _data()
    # A zero output kernel cuts the gradient to the hidden layer; learning rate 0 keeps it so.
    model = _model(keras.optimizers.SGD(0.0), out_initializer="zeros")
    monitor = GradientMonitor(x, y)
    with pytest.warns(UserWarning, match=r"vanishing gradients in layer\(s\) 'hidden'") as rec:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    assert "'out'" not in " ".join(_monitor_warnings(rec))
    assert [(a[0], a[1], a[2]) for a in monitor.alerts] == [(0, "hidden", "vanishing")]
    assert monitor.alerts[0][3] == 0.0


def test_warns_about_exploding_layers_by_name():
    x, y = _data(scale=1e5)
    model = _model(keras.optimizers.SGD(0.0))
    monitor = GradientMonitor(x, y, exploding_threshold=100.0)
    with pytest.warns(UserWarning, match="exploding gradients") as rec:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    message = " ".join(_monitor_warnings(rec))
    assert "'hidden'" in message and "'out'" in message
    assert {a[1] for a in monitor.alerts if a[2] == "exploding"} == {"hidden", "out"}


def test_warns_about_fast_growing_layers():
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.0))

    class ScaleUp(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                weights = self.model.get_weights()
                weights[2] = weights[2] * 100.0  # the output kernel
                self.model.set_weights(weights)

    monitor = GradientMonitor(x, y, exploding_threshold=None, growth_factor=10.0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[ScaleUp(), monitor])
    messages = _monitor_warnings(rec)
    assert len(messages) == 1 and "epoch 2" in messages[0] and "growing" in messages[0]
    grew = {a[1] for a in monitor.alerts if a[2] == "growing"}
    ratios = {k: v[1] / v[0] for k, v in monitor.norms.items()}
    assert grew == {k for k, r in ratios.items() if r > 10.0} and "hidden" in grew


def test_no_warning_on_healthy_training():
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.01))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[GradientMonitor(x, y)])
    assert _monitor_warnings(rec) == []


def test_needs_data_or_gradient_clip():
    x, y = _data()
    model = _model("sgd")
    with pytest.raises(ValueError, match="GradientClip"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradientMonitor()])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y": np.zeros(3)}, "without `x`"),
        ({"vanishing_threshold": -1.0}, "vanishing_threshold"),
        ({"exploding_threshold": 0.0}, "exploding_threshold"),
        ({"vanishing_threshold": 5.0, "exploding_threshold": 1.0}, "larger"),
        ({"growth_factor": 1.0}, "growth_factor"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


def test_config_round_trip():
    monitor = GradientMonitor(vanishing_threshold=1e-5, growth_factor=None, warn=False)
    clone = assert_config_round_trip(monitor)
    assert clone.growth_factor is None and clone.warn is False
