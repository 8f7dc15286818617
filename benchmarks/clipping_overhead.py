"""GradientClip: time per training step over the bare optimizer, and a divergence demo.

Run: `python benchmarks/clipping_overhead.py [--repeats 7] [--batch-size 128]`; the figures are
also written to `benchmarks/results/clipping_overhead.json` (the README quotes the demo's).

1. Overhead. A small MLP (64-256-256-10) on scikit-learn's digits data (repeated 8 times, so
   the per-epoch cost of `fit` is small) is trained one epoch at a time with plain SGD and with
   `GradientClip(SGD)` in each mode; the configurations are timed in turn within each round
   (side by side, same process), and the median time per step of each is divided by the bare
   optimizer's.
2. Demo. The same MLP on raw, unscaled pixel values (0-16) with a learning rate that is too
   high: plain SGD diverges (the loss becomes NaN or explodes), `GradientClip(SGD)` trains.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_safe.optimizers import GradientClip  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "clipping_overhead.json"

CONFIGS = {
    "bare SGD": None,
    "global_norm": {"mode": "global_norm"},
    "global_norm auto": {"mode": "global_norm", "clip_norm": "auto"},
    "per_layer": {"mode": "per_layer"},
    "per_layer (layer)": {"mode": "per_layer", "group": "layer"},
    "adaptive": {"mode": "adaptive"},
    "agc": {"mode": "agc"},
    "global_norm, no skip": {"mode": "global_norm", "skip_non_finite": False},
}


def mlp(optimizer, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def overhead(repeats, batch_size):
    x, y = load_digits(return_X_y=True)
    # Eight copies of the data: enough steps per epoch that `fit`'s per-epoch cost is small.
    x, y = np.tile((x / 16.0).astype("float32"), (8, 1)), np.tile(y, 8)
    steps = int(np.ceil(len(x) / batch_size))
    models = {}
    for name, kwargs in CONFIGS.items():
        inner = keras.optimizers.SGD(0.05)
        optimizer = inner if kwargs is None else GradientClip(inner, **kwargs)
        models[name] = mlp(optimizer)
        models[name].fit(x, y, batch_size=batch_size, epochs=1, verbose=0)  # trace + warm up
    times = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["bare SGD"])
    print(f"Overhead, MLP 64-256-256-10, digits, batch {batch_size}, {steps} steps per epoch,")
    print(f"median of {repeats} epochs per configuration:")
    print(f"{'configuration':<24}{'ms/step':>10}{'ratio':>8}")
    rows = {}
    for name in CONFIGS:
        median = statistics.median(times[name])
        print(f"{name:<24}{1000 * median:>10.3f}{median / base:>8.2f}")
        rows[name] = {"ms_per_step": 1000 * median, "ratio": median / base}
    return {"batch_size": batch_size, "steps_per_epoch": steps, "repeats": repeats, "modes": rows}


def demo(epochs=5):
    x, y = load_digits(return_X_y=True)
    x = x.astype("float32")  # deliberately not scaled: pixel values 0..16
    results = {}
    for name, optimizer in [
        ("SGD(lr=0.5)", keras.optimizers.SGD(0.5)),
        ("GradientClip(SGD(lr=0.5))", GradientClip(keras.optimizers.SGD(0.5), clip_norm=1.0)),
    ]:
        model = mlp(optimizer)
        history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
        logits = model.predict(x, verbose=0)
        accuracy = float(np.mean(np.argmax(logits, 1) == y)) if np.isfinite(logits).all() else 0.0
        results[name] = (history.history["loss"], accuracy)
    print(f"\nDemo: unscaled digits (pixels 0..16), learning rate 0.5, {epochs} epochs")
    for name, (losses, accuracy) in results.items():
        shown = ", ".join(f"{v:.3g}" for v in losses)
        print(f"{name:<28} loss per epoch: {shown}; train accuracy {accuracy:.3f}")
    runs = {}
    for key, (name, (losses, accuracy)) in zip(("plain", "clipped"), results.items()):
        runs[key] = {
            "optimizer": name,
            "loss_per_epoch": [float(v) for v in losses],
            "train_accuracy": accuracy,
        }
    return {"epochs": epochs, "runs": runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    results = {"overhead": overhead(args.repeats, args.batch_size), "demo": demo()}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
