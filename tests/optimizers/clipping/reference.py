"""Shared numpy reference for the clip-rule tests: a two-layer linear model trained with plain
SGD, its gradients by hand, and a training loop that applies a clipping rule written in numpy."""

import math

import keras
import numpy as np

from keras_safe.optimizers import GradientClip

LR = 0.05
BATCH = 8
PATHS = ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]


def data(seed=0, batches=6):
    """Inputs and targets whose scale changes from batch to batch, so norms vary a lot."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * batches, 3)).astype("float32")
    y = rng.normal(size=(BATCH * batches, 2)).astype("float32")
    scales = np.array([1.0, 30.0, 0.2, 5.0, 60.0, 0.5][:batches], "float32")
    y *= np.repeat(scales, BATCH)[:, None]
    return x, y


def initial_weights(seed=1):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(3, 4)).astype("float32"),
        rng.normal(scale=0.1, size=(4,)).astype("float32"),
        rng.normal(size=(4, 2)).astype("float32"),
        rng.normal(scale=0.1, size=(2,)).astype("float32"),
    ]


def model(optimizer, weights):
    net = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(2, name="out"),
        ]
    )
    net.set_weights(weights)
    net.compile(optimizer=optimizer, loss="mse")
    return net


def numpy_gradients(weights, x, y):
    """Gradients of mean squared error of the two-layer linear model, by hand."""
    w1, b1, w2, b2 = [w.astype(np.float64) for w in weights]
    x, y = x.astype(np.float64), y.astype(np.float64)
    h = x @ w1 + b1
    out = h @ w2 + b2
    d_out = 2.0 * (out - y) / out.size
    d_h = d_out @ w2.T
    return [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]


def norm(a):
    return math.sqrt(float(np.sum(np.square(a))))


class ReferenceRule:
    """A clipping rule in numpy; subclasses implement `rule(grads, weights)`.

    `rule` returns `(clipped gradients, whether anything was clipped)`. The statistics a
    `GradientClip` keeps are counted here: steps, clipped steps, the last global norm, and
    `threshold` for the rules that move it.
    """

    threshold = None

    def __init__(self):
        self.steps = 0
        self.clipped = 0
        self.last_norm = None

    def __call__(self, grads, weights):
        self.last_norm = math.sqrt(sum(norm(g) ** 2 for g in grads))
        self.steps += 1
        clipped, was_clipped = self.rule(grads, weights)
        self.clipped += bool(was_clipped)
        return clipped

    def rule(self, grads, weights):
        raise NotImplementedError


def reference_training(reference, weights, x, y):
    """Plain SGD over the batches of `x`, `y` in order, each gradient clipped by `reference`."""
    weights = [w.astype(np.float64) for w in weights]
    for start in range(0, len(x), BATCH):
        grads = numpy_gradients(weights, x[start : start + BATCH], y[start : start + BATCH])
        clipped = reference(grads, weights)
        weights = [w - LR * g for w, g in zip(weights, clipped, strict=True)]
    return weights


def assert_matches_reference(mode, kwargs, make_reference):
    """Trains `GradientClip(SGD, mode=mode, **kwargs)` for one epoch and compares the weights,
    the statistics and the per-variable norms with the numpy rule `make_reference()`.

    Returns:
        The trained optimizer.
    """
    x, y = data()
    weights = initial_weights()
    reference = make_reference()
    expected = reference_training(reference, weights, x, y)
    # The case must be informative: some steps clipped, some not.
    assert 0 < reference.clipped < reference.steps, (reference.clipped, reference.steps)

    optimizer = GradientClip(keras.optimizers.SGD(LR), mode=mode, **kwargs)
    net = model(optimizer, weights)
    net.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    for got, want in zip(net.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    logs = {k: float(np.asarray(v)) for k, v in optimizer.step_logs().items()}
    np.testing.assert_allclose(logs["grad_norm"], reference.last_norm, rtol=1e-4)
    np.testing.assert_allclose(logs["clip_fraction"], reference.clipped / reference.steps)
    assert logs["skipped_steps"] == 0
    assert int(optimizer.iterations) == reference.steps
    if reference.threshold is not None:
        np.testing.assert_allclose(logs["clip_norm"], reference.threshold, rtol=1e-4)
    else:
        assert "clip_norm" not in logs
    # Recorded per-variable norms are those of the last step, before clipping.
    last_weights = reference_training(make_reference(), weights, x[:-BATCH], y[:-BATCH])
    last_grads = numpy_gradients(last_weights, x[-BATCH:], y[-BATCH:])
    norms = {k: float(v) for k, v in optimizer.variable_grad_norms().items()}
    assert [p.split("/", 1)[1] for p in norms] == PATHS
    np.testing.assert_allclose(list(norms.values()), [norm(g) for g in last_grads], rtol=1e-4)
    return optimizer
