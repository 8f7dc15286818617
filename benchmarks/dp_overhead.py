"""DP-SGD throughput over plain Keras throughput, measured side by side in one process.

Models (synthetic data of the right shapes; speed does not depend on the values):
- cnn: TF Privacy's tutorial CNN on 28x28x1, batch 250.
- mlp: 784-512-512-10, batch 256.
- text: Embedding(10000, 64) over 100 tokens, average pooling, Dense 64, Dense 2; batch 256.
- lstm: Embedding + LSTM(32) + Dense (recurrent: per-example Jacobian path); batch 64.

Usage: python benchmarks/dp_overhead.py [--steps 30] [--repeats 3] [--models cnn,mlp,text,lstm]
Prints the best examples/s of plain and DP training and the median ratio (DP / plain) of
epochs timed alternately (plain, DP, plain, DP, ...), so a change of machine load hits both.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_safe  # noqa: E402


def cnn():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
            keras.layers.MaxPool2D(2, 1),
            keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
            keras.layers.MaxPool2D(2, 1),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def text():
    return keras.Sequential(
        [
            keras.Input((100,), dtype="int32"),
            keras.layers.Embedding(10000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(2),
        ]
    )


def lstm():
    return keras.Sequential(
        [
            keras.Input((40,), dtype="int32"),
            keras.layers.Embedding(2000, 32),
            keras.layers.LSTM(32),
            keras.layers.Dense(2),
        ]
    )


MODELS = {
    "cnn": (cnn, 250, lambda n, r: r.normal(size=(n, 28, 28, 1)).astype("float32"), 10),
    "mlp": (mlp, 256, lambda n, r: r.normal(size=(n, 784)).astype("float32"), 10),
    "text": (text, 256, lambda n, r: r.integers(0, 10000, (n, 100)).astype("int32"), 2),
    "lstm": (lstm, 64, lambda n, r: r.integers(0, 2000, (n, 40)).astype("int32"), 2),
}


def _compiled(factory, dp):
    keras.utils.set_random_seed(0)
    model = factory()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if dp:
        optimizer = keras_safe.optimizers.DPSGD(
            learning_rate=0.05, l2_norm_clip=1.0, noise_multiplier=1.1
        )
        model.compile(optimizer=optimizer, loss=loss)
        keras_safe.privacy.make_private(model)
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    return model


def _epoch_seconds(model, x, y, batch_size):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def _compare(plain, private, x, y, batch_size, repeats):
    """Times plain and DP epochs alternately, so load changes hit both alike.

    Returns the best examples/s of each and the median of the per-round ratios.
    """
    for model in (plain, private):  # warm-up: tracing and compilation
        model.fit(x[: batch_size * 2], y[: batch_size * 2], batch_size=batch_size, verbose=0)
    plain_times, private_times = [], []
    for _ in range(repeats):
        plain_times.append(_epoch_seconds(plain, x, y, batch_size))
        private_times.append(_epoch_seconds(private, x, y, batch_size))
    ratios = sorted(p / d for p, d in zip(plain_times, private_times))
    return len(x) / min(plain_times), len(x) / min(private_times), ratios[len(ratios) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed epochs")
    parser.add_argument("--models", default="cnn,mlp,text,lstm")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__}, keras_safe {keras_safe.__version__}")
    print(f"{'model':6} {'batch':>5} {'plain ex/s':>11} {'DP ex/s':>9} {'DP/plain':>9}")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    for name in args.models.split(","):
        factory, batch, make_x, classes = MODELS[name]
        n = batch * args.steps
        x, y = make_x(n, rng), rng.integers(0, classes, n)
        plain, private, ratio = _compare(
            _compiled(factory, False), _compiled(factory, True), x, y, batch, args.repeats
        )
        print(f"{name:6} {batch:5d} {plain:11.0f} {private:9.0f} {ratio:9.2f}", flush=True)


if __name__ == "__main__":
    main()
