"""DP-SGD and plain Keras throughput on one device and under MirroredStrategy on two devices.

The machine's CPU is split into two logical devices (`tf.config.set_logical_device_configuration`,
before TensorFlow starts), so the two-device runs share the same cores as the one-device runs:
the figures show what the distributed step costs (the per-replica noise, the sum of the noisy
gradients over the replicas, the split batches), not the speed-up of more hardware. On a machine
with several GPUs, list them in `--devices` instead.

Models (synthetic data of the right shapes; speed does not depend on the values):
- mlp: 784-512-512-10, global batch 256.
- cnn: TF Privacy's tutorial CNN on 28x28x1, global batch 250 (125 per replica).

Usage: python benchmarks/dp_distributed.py [--steps 40] [--repeats 3] [--models mlp,cnn]
Prints examples/s (best timed epoch) of plain and DP training on one device and on two, side
by side, the DP/plain ratio of each, and the two-device/one-device ratio of each, from epochs
timed round-robin (so a change of machine load hits every configuration alike).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_safe  # noqa: E402


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


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


MODELS = {
    "mlp": (mlp, 256, lambda n, r: r.normal(size=(n, 784)).astype("float32")),
    "cnn": (cnn, 250, lambda n, r: r.normal(size=(n, 28, 28, 1)).astype("float32")),
}


def _compiled(factory, dp, strategy):
    def build():
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

    if strategy is None:
        return build()
    with strategy.scope():
        return build()


def _epoch_seconds(model, x, y, batch_size):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def _measure(factory, batch, x, y, strategy, repeats):
    """Best examples/s of {(devices, dp)}: epochs timed round-robin after a warm-up."""
    models = {
        (devices, dp): _compiled(factory, dp, strategy if devices == 2 else None)
        for devices in (1, 2)
        for dp in (False, True)
    }
    for model in models.values():  # warm-up: tracing and compilation
        model.fit(x[: batch * 2], y[: batch * 2], batch_size=batch, verbose=0)
    times = {key: [] for key in models}
    for _ in range(repeats):
        for key, model in models.items():
            times[key].append(_epoch_seconds(model, x, y, batch))
    return {key: len(x) / min(seconds) for key, seconds in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument(
        "--devices", default="/cpu:0,/cpu:1", help="the two devices of the MirroredStrategy"
    )
    args = parser.parse_args(argv)
    strategy = tf.distribute.MirroredStrategy(args.devices.split(","))
    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, keras_safe ", end="")
    print(f"{keras_safe.__version__}; two devices: {args.devices}")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    header = (
        f"{'model':6} {'batch':>5} {'devices':>7} {'plain ex/s':>11} {'DP ex/s':>9} {'DP/plain':>9}"
    )
    print(header)
    for name in args.models.split(","):
        factory, batch, make_x = MODELS[name]
        n = batch * args.steps
        x, y = make_x(n, rng), rng.integers(0, 10, n)
        speed = _measure(factory, batch, x, y, strategy, args.repeats)
        for devices in (1, 2):
            plain, private = speed[(devices, False)], speed[(devices, True)]
            print(
                f"{name:6} {batch:5d} {devices:7d} {plain:11.0f} {private:9.0f} "
                f"{private / plain:9.2f}"
            )
        print(
            f"{name:6} two devices / one: plain {speed[(2, False)] / speed[(1, False)]:.2f}, "
            f"DP {speed[(2, True)] / speed[(1, True)]:.2f}",
            flush=True,
        )
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
