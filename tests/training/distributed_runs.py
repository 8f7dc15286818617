"""Distributed DP runs for tests/training/test_distribution.py, each in its own process.

TensorFlow fixes its devices when it starts, so the runs that need two logical CPU devices
(MirroredStrategy) or a TF_CONFIG cluster (MultiWorkerMirroredStrategy) cannot run inside the
test process. Usage:

    python distributed_runs.py mirrored OUT.json
    python distributed_runs.py worker INDEX PORT0,PORT1 OUT.json

Each run trains small models under the strategy and, for comparison, on one device in the same
process, and writes what the tests check (updates, weights, ledgers, epsilon, the errors of the
refused setups) to OUT.json. The tests compare them with independent references (the Gaussian
mechanism's standard deviation, dp_accounting's epsilon); nothing here asserts.
"""

import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

MODE = sys.argv[1]
if MODE == "worker":
    PORTS = sys.argv[3].split(",")
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in PORTS]},
            "task": {"type": "worker", "index": int(sys.argv[2])},
        }
    )

import tensorflow as tf  # noqa: E402

if MODE == "mirrored":
    _CPU = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

keras.config.disable_traceback_filtering()
import numpy as np  # noqa: E402

import keras_safe  # noqa: E402
from keras_safe.optimizers import DPSGD, DPOptimizer, GradientClip  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 3, n)


def _classifier(optimizer, strategy=None, robust=False, regularized=False):
    """The same small classifier (same initial weights) under `strategy` or on one device.

    Under MultiWorkerMirroredStrategy the model object is made outside the strategy's scope
    and built, compiled and trained inside it: Keras 3's `fit` cannot start on a model made
    inside that scope (keras-team/keras#20585).
    """
    keras.utils.set_random_seed(1)
    regularizer = keras.regularizers.L2(0.05) if regularized else None
    layers = [
        keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer),
        keras.layers.Dense(3),
    ]
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    model = keras.Sequential(layers) if multi_worker else None
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        if model is None:
            model = keras.Sequential([keras.Input((4,)), *layers])
        model.build((None, 4))
        model.compile(optimizer=optimizer(), loss=LOSS)
        model.optimizer.build(model.trainable_variables)
        if robust:
            keras_safe.security.make_robust(model, 0.1, steps=2, random_start=False)
        return keras_safe.privacy.make_private(model)


def _weights(model):
    return [np.array(w, dtype="float64") for w in model.get_weights()]


def _compare(distributed, single, start):
    """Largest weight difference, and the largest move from the start (to show it trained)."""
    a, b = _weights(distributed), _weights(single)
    return {
        "max_difference": max(float(np.max(np.abs(u - v))) for u, v in zip(a, b)),
        "max_move": max(float(np.max(np.abs(u - s))) for u, s in zip(b, start)),
    }


def _error(run):
    """Runs `run()`; returns the error it raised as (class name, message), or None."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 - the tests check the class and the message
        return {"type": type(error).__name__, "message": str(error)}
    return None


# The zero-gradient update's size: 65,536 noise values, enough for a chi-square check that a
# noise scale 5% off fails (tests.statistical).
NOISE_INPUTS, NOISE_UNITS = 64, 1024


def _zero_gradient_update(strategy, seed=None, batch=16):
    """One DP step on all-zero data: the update is the noise alone, lr * (sum of noise) / B."""
    keras.utils.set_random_seed(1)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    layer = keras.layers.Dense(NOISE_UNITS, use_bias=False)
    model = keras.Sequential([layer]) if multi_worker else None
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        if model is None:
            model = keras.Sequential([keras.Input((NOISE_INPUTS,)), layer])
        model.build((None, NOISE_INPUTS))
        model.compile(
            optimizer=DPSGD(0.1, l2_norm_clip=2.0, noise_multiplier=1.3, seed=seed),
            loss="mse",
        )
        model.optimizer.build(model.trainable_variables)
        keras_safe.privacy.make_private(model)
        before = np.array(model.trainable_variables[0], dtype="float64")
        if multi_worker:
            zeros = (
                np.zeros((batch * 4, NOISE_INPUTS), "float32"),
                np.zeros((batch * 4, NOISE_UNITS), "float32"),
            )
            data = keras_safe.privacy.poisson_batches(
                *zeros, batch_size=batch, epochs=0.25, strategy=strategy
            )
            model.fit(data, verbose=0)
        else:
            zeros = (
                np.zeros((batch, NOISE_INPUTS), "float32"),
                np.zeros((batch, NOISE_UNITS), "float32"),
            )
            model.fit(*zeros, batch_size=batch, verbose=0)
    update = before - np.array(model.trainable_variables[0], dtype="float64")
    return update.ravel().tolist()


def _replica_draws(strategy):
    """Each replica's own noise draw for one update, with the same seed on every replica."""

    @tf.function
    def draws():
        return strategy.run(lambda: keras_safe.optimizers.replicas.noise_share(5, 0, 65536, 1.0))

    return [np.asarray(d).tolist() for d in strategy.experimental_local_results(draws())]


# -- MirroredStrategy on two logical CPU devices ---------------------------------------------------


def mirrored():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync, "seconds": {}}
    runs = {
        "zero_gradient_update": lambda: _zero_gradient_update(strategy),
        "replica_draws": lambda: _replica_draws(strategy),
        "noise_free": lambda: _noise_free_runs(strategy),
        "epsilon": lambda: _epsilon_run(strategy),
        "refused": lambda: _refused_runs(strategy),
    }
    for name, run in runs.items():
        start = time.perf_counter()
        out[name] = run()
        out["seconds"][name] = time.perf_counter() - start
    return out


def _noise_free_runs(strategy):
    x, y = _data(100)
    runs = {
        # Every part of the step at once: GradientClip clips the global update, Adam's moments
        # follow it, the weight penalty's gradient is added once, and the batch is replaced by
        # its adversarial examples.
        "gradient_clip_dpadam_adversarial_regularized": (
            lambda: GradientClip(
                keras_safe.optimizers.DPAdam(0.05, l2_norm_clip=0.3, noise_multiplier=0.0),
                clip_norm=0.05,
            ),
            {"robust": True, "regularized": True},
        ),
    }
    out = {}
    for name, (optimizer, options) in runs.items():
        both = [_classifier(optimizer, s, **options) for s in (strategy, None)]
        start = _weights(both[1])
        # 100 examples in batches of 24: the last batch (4 examples) is partial.
        histories = [
            m.fit(x, y, batch_size=24, shuffle=False, verbose=0).history["loss"] for m in both
        ]
        out[name] = _compare(*both, start)
        out[name]["losses"] = histories
        out[name]["ledgers"] = [keras_safe.privacy.get_ledger(m).segments() for m in both]
    # Poisson batches built for the strategy (one shard per replica), against the same batches
    # (the same seed) on one device.
    x, y = _data(400)
    both = [
        _classifier(lambda: DPSGD(0.5, l2_norm_clip=0.3, noise_multiplier=0.0), s)
        for s in (strategy, None)
    ]
    start = _weights(both[1])
    for model in both:
        data = keras_safe.privacy.poisson_batches(
            x, y, batch_size=40, epochs=1, seed=3, strategy=strategy
        )
        model.fit(data, verbose=0)
    out["poisson_shards"] = _compare(*both, start)
    out["poisson_shards"]["ledgers"] = [keras_safe.privacy.get_ledger(m).segments() for m in both]
    info = keras_safe.privacy.sampling.poisson_info(data)
    out["poisson_shards"]["info"] = {"shards": info.shards, "rows": info.max_batch_size}
    return out


def _epsilon_run(strategy):
    x, y = _data(200)
    model = _classifier(lambda: DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1), strategy)
    budget = keras_safe.callbacks.PrivacyBudget(delta=1e-5, verbose=0)
    history = model.fit(x, y, batch_size=20, epochs=2, callbacks=[budget], verbose=0)
    ledger = keras_safe.privacy.get_ledger(model)
    return {
        "epsilon": budget.epsilon,
        "history": history.history["epsilon"],
        "steps": ledger.steps,
        "segments": ledger.segments(),
    }


class MixedStep(keras.Model):
    """A custom train step whose second replica applies plain (unclipped, noiseless) gradients."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
        index = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
        if index == 0:
            grads = keras_safe.privacy.dp_gradients(self, x, y, weights)
        else:
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x, y, self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {}


def _refused_runs(strategy):
    x, y = _data(96)

    def dp():
        return DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0)

    def fit(model, *args, **kwargs):
        before = _weights(model)
        error = _error(lambda: model.fit(*args, verbose=0, **kwargs))
        ledger = keras_safe.privacy.get_ledger(model, create=True)
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, _weights(model)))
        return {
            "error": error,
            "steps": ledger.steps,
            "segments": ledger.segments(),
            "weights_unchanged": unchanged,
        }

    out = {}
    central = tf.distribute.experimental.CentralStorageStrategy(["/cpu:0", "/cpu:1"])
    out["central_storage"] = fit(_classifier(dp, central), x, y, batch_size=24)
    # The global batch of a dataset is its batch (Keras splits it between the replicas):
    # declaring the per-replica batch size (12) would halve the sampling rate in the accounting.
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(24, drop_remainder=True)

    def declared():
        return DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, num_examples=96, batch_size=12)

    out["static_batch_mismatch"] = fit(_classifier(declared, strategy), batched)
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).batch(24)
    out["runtime_batch_mismatch"] = fit(_classifier(declared, strategy), unknown)
    with strategy.scope():
        mixed = MixedStep()
        mixed.compile(optimizer=dp(), loss="mse")
        keras_safe.privacy.make_private(mixed)
        mixed(x[:1])
    out["one_replica_unclipped"] = fit(mixed, x, np.zeros((96, 3), "float32"), batch_size=24)
    # train_on_batch hands every replica the whole batch: each example would count twice.
    whole = _classifier(declared, strategy)
    before = _weights(whole)
    error = _error(lambda: whole.train_on_batch(x[:12], y[:12]))
    out["train_on_batch"] = {
        "error": error,
        "steps": keras_safe.privacy.get_ledger(whole).steps,
        "segments": keras_safe.privacy.get_ledger(whole).segments(),
        "weights_unchanged": all(np.array_equal(a, b) for a, b in zip(before, _weights(whole))),
    }
    with strategy.scope():
        plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        plain.compile(optimizer=dp(), loss=LOSS)
    out["keras_default_step"] = fit(plain, x, y, batch_size=24)
    micro = _classifier(
        lambda: DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, num_microbatches=4), strategy
    )
    out["microbatches"] = fit(micro, x, y, batch_size=24)
    inner_clip = _classifier(
        lambda: DPOptimizer(
            keras.optimizers.SGD(0.1, clipnorm=1.0), l2_norm_clip=1.0, noise_multiplier=1.0
        ),
        strategy,
    )
    out["inner_clipnorm"] = fit(inner_clip, x, y, batch_size=24)
    return out


# -- MultiWorkerMirroredStrategy: one process per worker -------------------------------------------


def worker():
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    out = {"replicas": strategy.num_replicas_in_sync}
    x, y = _data(400)
    # Noise 0: the sharded Poisson batches (same seed on both workers, for the comparison)
    # against the same batches on one device in this process.
    both = [
        _classifier(lambda: DPSGD(0.5, l2_norm_clip=0.3, noise_multiplier=0.0), s)
        for s in (strategy, None)
    ]
    start = _weights(both[1])
    for model, scope in zip(both, (strategy.scope(), contextlib.nullcontext())):
        data = keras_safe.privacy.poisson_batches(
            x, y, batch_size=40, epochs=1, seed=3, strategy=strategy
        )
        with scope:
            model.fit(data, verbose=0)
    out["noise_free"] = _compare(*both, start)
    out["noise_free"]["weights"] = [w.ravel().tolist() for w in _weights(both[0])]
    out["noise_free"]["ledgers"] = [keras_safe.privacy.get_ledger(m).segments() for m in both]
    # Noise on: the same user seed on both workers must still give independent draws.
    out["zero_gradient_update"] = _zero_gradient_update(strategy, seed=11)
    # Epsilon of a Poisson run whose sampling seeds come from each worker's OS entropy.
    model = _classifier(lambda: DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1), strategy)
    budget = keras_safe.callbacks.PrivacyBudget(delta=1e-5, verbose=0)
    with strategy.scope():
        model.fit(
            keras_safe.privacy.poisson_batches(x, y, batch_size=40, epochs=2, strategy=strategy),
            callbacks=[budget],
            verbose=0,
        )
    ledger = keras_safe.privacy.get_ledger(model)
    out["epsilon"] = {
        "epsilon": budget.epsilon,
        "steps": ledger.steps,
        "segments": ledger.segments(),
    }
    # Refused before any step (no collective runs, so each worker refuses on its own).
    refused = {}
    model = _classifier(lambda: DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0), strategy)
    with strategy.scope():
        refused["arrays"] = _error(lambda: model.fit(x, y, batch_size=40, verbose=0))
    refused["arrays_segments"] = keras_safe.privacy.get_ledger(model).segments()
    model = _classifier(lambda: DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0), strategy)
    unsharded = keras_safe.privacy.poisson_batches(x, y, batch_size=40, epochs=1)
    with strategy.scope():
        refused["unsharded_poisson"] = _error(lambda: model.fit(unsharded, verbose=0))
    refused["steps"] = keras_safe.privacy.get_ledger(model).steps
    out["refused"] = refused
    return out


if __name__ == "__main__":
    result = mirrored() if MODE == "mirrored" else worker()
    with open(sys.argv[-1], "w") as handle:
        json.dump(result, handle)
