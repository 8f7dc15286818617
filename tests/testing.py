"""Test helpers shared by every keras_safe test, built on public Keras APIs only.

The helpers check the Keras conventions every public class must follow:

- `assert_config_round_trip(obj)`: `get_config` / `from_config` and Keras's own
  `serialize_keras_object` / `deserialize_keras_object` give back an equal config.
- `run_layer_test(...)`: a layer builds, gives the expected output shape, round-trips its
  config, trains one `fit` step inside a model and survives `.keras` saving.
- `assert_fit_one_step(model, x, y)`: one `fit` step runs and changes some weight.
- `assert_saves_in_fresh_process(models_and_inputs)`: every model is saved to `.keras` and
  loaded by `keras.saving.load_model` in a new Python process that only imports
  `keras_safe`; the loaded model must predict the same outputs and keep its optimizer class.
- `CarryOver`: an attacker's layer that keeps a tensor from one call for the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_config_round_trip(obj):
    """Checks that `obj` rebuilds from its config and serializes through Keras."""
    config = obj.get_config()
    json.dumps(config, default=str)  # must be JSON-friendly
    clone = obj.__class__.from_config(config)
    assert clone.get_config() == config, (clone.get_config(), config)
    serialized = keras.saving.serialize_keras_object(obj)
    assert serialized["module"].startswith("keras_safe") or serialized.get("registered_name", "")
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(obj)
    assert restored.get_config() == config
    return clone


def assert_fit_one_step(model, x, y=None, **fit_kwargs):
    """Runs one `fit` step and checks that a trainable weight moved and losses are finite."""
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(x, y, epochs=1, steps_per_epoch=1, verbose=0, **fit_kwargs)
    after = [np.array(w) for w in model.trainable_weights]
    assert any(not np.allclose(b, a) for b, a in zip(before, after)), "fit changed no weight"
    for name, values in history.history.items():
        assert np.all(np.isfinite(values)), f"{name} is not finite: {values}"
    return history


def run_layer_test(
    layer_factory,
    input_data,
    expected_output_shape=None,
    run_training=True,
    run_saving=True,
    optimizer="sgd",
):
    """Checks one layer's shape, config, training step and saving.

    Args:
        layer_factory: a zero-argument callable returning a fresh layer.
        input_data: a numpy array fed to the layer (batch first).
        expected_output_shape: the shape of the layer's output on `input_data`, or None to skip.
        run_training: whether to fit one step of `Sequential([Input, layer, Dense(1)])`.
        run_saving: whether to save and reload that model in a fresh process.
        optimizer: optimizer used for the training step.

    Returns:
        The model built around the layer.
    """
    layer = layer_factory()
    output = layer(input_data)
    if expected_output_shape is not None:
        assert tuple(output.shape) == tuple(expected_output_shape), output.shape
    assert_config_round_trip(layer)

    inputs = keras.Input(shape=input_data.shape[1:], dtype=str(input_data.dtype))
    features = layer_factory()(inputs)
    if len(features.shape) > 2:
        features = keras.layers.Flatten()(features)
    outputs = keras.layers.Dense(1)(features)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=optimizer, loss="mse")
    if run_training:
        y = np.random.default_rng(0).normal(size=(len(input_data), 1)).astype("float32")
        assert_fit_one_step(model, input_data, y, batch_size=len(input_data))
    if run_saving:
        assert_saves_in_fresh_process([(model, input_data)])
    return model


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_safe  # registers the serializable classes
    cases = json.loads(sys.argv[1])
    for case in cases:
        model = keras.saving.load_model(case["path"])
        inputs = np.load(case["inputs"], allow_pickle=False)
        expected = np.load(case["outputs"], allow_pickle=False)
        got = np.asarray(model.predict(inputs, verbose=0))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        if case["optimizer"] is not None:
            name = type(model.optimizer).__name__
            assert name == case["optimizer"], (name, case["optimizer"])
        if case["fit"]:
            if keras_safe.optimizers.find_dp_optimizer(model.optimizer) is not None:
                keras_safe.privacy.make_private(model)
            y = np.load(case["y"], allow_pickle=False)
            model.fit(inputs, y, epochs=1, batch_size=len(inputs), verbose=0)
    print("LOADED", len(cases))
    """
)


def assert_saves_in_fresh_process(models_and_inputs, fit_after_load=None):
    """Saves each model to `.keras` and reloads all of them in one new Python process.

    Args:
        models_and_inputs: a list of `(model, inputs)` pairs; `inputs` is a numpy array.
        fit_after_load: optional list of target arrays (one per model, or None) to run one
            `fit` step on the reloaded model, checking the saved compile state trains.
    """
    tmp = tempfile.mkdtemp(prefix="keras_safe_save_")
    cases = []
    for i, (model, inputs) in enumerate(models_and_inputs):
        path = os.path.join(tmp, f"model_{i}.keras")
        model.save(path)
        in_path = os.path.join(tmp, f"inputs_{i}.npy")
        out_path = os.path.join(tmp, f"outputs_{i}.npy")
        np.save(in_path, inputs)
        np.save(out_path, np.asarray(model.predict(inputs, verbose=0)))
        optimizer = getattr(model, "optimizer", None)
        case = {
            "path": path,
            "inputs": in_path,
            "outputs": out_path,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "fit": False,
        }
        if fit_after_load is not None and fit_after_load[i] is not None:
            y_path = os.path.join(tmp, f"y_{i}.npy")
            np.save(y_path, fit_after_load[i])
            case.update(fit=True, y=y_path)
        cases.append(case)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"LOADED {len(cases)}" in result.stdout


class CarryOver(keras.layers.Layer):
    """Adds the mean of the rows its previous call saw, in the same graph or one enclosing it:
    harmless where the model runs once per traced step, mixing examples where it runs again in
    the same step (the chunks of a batch, in a loop's body or not; a custom loop's second
    step)."""

    def call(self, t):
        previous = getattr(self, "_previous", None)
        self._previous = t
        graph = getattr(t, "graph", None)
        while graph is not None and graph is not getattr(previous, "graph", 0):
            graph = getattr(graph, "outer_graph", None)
        if graph is None:
            return t
        return t + keras.ops.mean(previous)
