"""Tests for keras_safe.optimizers.GradientClip against hand-computed numpy references."""

import math

import keras
import numpy as np
import pytest

from keras_safe.optimizers import GradientClip
from tests.testing import assert_config_round_trip, assert_saves_in_fresh_process

LR = 0.05
BATCH = 8


# ----------------------------------------------------------------------------- numpy reference


def _data(seed=0, batches=6):
    """Inputs and targets whose scale changes from batch to batch, so norms vary a lot."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * batches, 3)).astype("float32")
    y = rng.normal(size=(BATCH * batches, 2)).astype("float32")
    scales = np.array([1.0, 30.0, 0.2, 5.0, 60.0, 0.5][:batches], "float32")
    y *= np.repeat(scales, BATCH)[:, None]
    return x, y


def _initial_weights(seed=1):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(3, 4)).astype("float32"),
        rng.normal(scale=0.1, size=(4,)).astype("float32"),
        rng.normal(size=(4, 2)).astype("float32"),
        rng.normal(scale=0.1, size=(2,)).astype("float32"),
    ]


def _model(optimizer, weights):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(2, name="out"),
        ]
    )
    model.set_weights(weights)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _numpy_gradients(weights, x, y):
    """Gradients of mean squared error of the two-layer linear model, by hand."""
    w1, b1, w2, b2 = [w.astype(np.float64) for w in weights]
    x, y = x.astype(np.float64), y.astype(np.float64)
    h = x @ w1 + b1
    out = h @ w2 + b2
    d_out = 2.0 * (out - y) / out.size
    d_h = d_out @ w2.T
    return [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]


def _norm(a):
    return math.sqrt(float(np.sum(np.square(a))))


def _ref_unit_norms(a):
    if a.ndim <= 1:
        return np.full_like(a, _norm(a))
    return np.sqrt(np.sum(a**2, axis=tuple(range(a.ndim - 1)), keepdims=True))


class _Reference:
    """Plain-Python clipping rules, written from the papers, applied with plain SGD."""

    def __init__(self, mode, **kw):
        self.mode, self.kw = mode, kw
        self.threshold = kw.get("clip_norm", 1.0)
        self.average = None
        if kw.get("clip_norm") == "auto":
            self.threshold = math.inf
        self.clipped = 0
        self.steps = 0
        self.last_norm = None

    def clip(self, grads, weights):
        total = math.sqrt(sum(_norm(g) ** 2 for g in grads))
        self.last_norm = total
        self.steps += 1
        if self.mode in ("global_norm", "adaptive"):
            c = self.threshold
            factor = 1.0 if total <= c else c / total
            self.clipped += total > c
            if self.mode == "adaptive":
                below = 1.0 if total <= c else 0.0
                q, eta = self.kw.get("target_quantile", 0.5), self.kw.get("lr", 0.2)
                self.threshold = c * math.exp(-eta * (below - q))
            elif self.kw.get("clip_norm") == "auto":
                kept = min(total, c)
                decay = self.kw.get("ema_decay", 0.99)
                if self.average is None:
                    self.average = kept
                else:
                    self.average = decay * self.average + (1 - decay) * kept
                self.threshold = self.kw.get("auto_factor", 2.0) * self.average
            return [g * factor for g in grads]
        if self.mode == "per_layer":
            c = self.kw["clip_norm"]
            if self.kw.get("group") == "layer":
                groups = [[0, 1], [2, 3]]
            else:
                groups = [[0], [1], [2], [3]]
            out = list(grads)
            any_clipped = False
            for group in groups:
                n = math.sqrt(sum(_norm(grads[i]) ** 2 for i in group))
                if n > c:
                    any_clipped = True
                    for i in group:
                        out[i] = grads[i] * (c / n)
            self.clipped += any_clipped
            return out
        # agc
        lam, eps = self.kw["clip_factor"], self.kw.get("epsilon", 1e-3)
        out, any_clipped = [], False
        for g, w in zip(grads, weights, strict=True):
            max_norm = lam * np.maximum(_ref_unit_norms(w.astype(np.float64)), eps)
            g_norm = _ref_unit_norms(g)
            trigger = g_norm > max_norm
            any_clipped |= bool(trigger.any())
            out.append(np.where(trigger, g * max_norm / np.maximum(g_norm, 1e-30), g))
        self.clipped += any_clipped
        return out


def _reference_training(reference, weights, x, y):
    weights = [w.astype(np.float64) for w in weights]
    for start in range(0, len(x), BATCH):
        grads = _numpy_gradients(weights, x[start : start + BATCH], y[start : start + BATCH])
        clipped = reference.clip(grads, weights)
        weights = [w - LR * g for w, g in zip(weights, clipped, strict=True)]
    return weights


MODE_CASES = [
    ("global_norm", {"clip_norm": 20.0}),
    ("global_norm", {"clip_norm": "auto", "auto_factor": 1.5, "ema_decay": 0.5}),
    ("per_layer", {"clip_norm": 8.0}),
    ("per_layer", {"clip_norm": 8.0, "group": "layer"}),
    ("adaptive", {"clip_norm": 12.0, "target_quantile": 0.5, "quantile_learning_rate": 0.4}),
    ("agc", {"clip_factor": 15.0, "epsilon": 1e-3}),
]


@pytest.mark.parametrize(("mode", "kwargs"), MODE_CASES, ids=lambda c: str(c))
def test_each_mode_matches_numpy_reference(mode, kwargs):
    x, y = _data()
    weights = _initial_weights()
    ref_kwargs = dict(kwargs)
    if "quantile_learning_rate" in ref_kwargs:
        ref_kwargs["lr"] = ref_kwargs.pop("quantile_learning_rate")
    reference = _Reference(mode, **ref_kwargs)
    expected = _reference_training(reference, weights, x, y)
    # The case must be informative: some steps clipped, some not.
    assert 0 < reference.clipped < reference.steps, (reference.clipped, reference.steps)

    optimizer = GradientClip(keras.optimizers.SGD(LR), mode=mode, **kwargs)
    model = _model(optimizer, weights)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    logs = {k: float(np.asarray(v)) for k, v in optimizer.step_logs().items()}
    np.testing.assert_allclose(logs["grad_norm"], reference.last_norm, rtol=1e-4)
    np.testing.assert_allclose(logs["clip_fraction"], reference.clipped / reference.steps)
    assert logs["skipped_steps"] == 0
    assert int(optimizer.iterations) == reference.steps
    if mode == "adaptive" or kwargs.get("clip_norm") == "auto":
        np.testing.assert_allclose(logs["clip_norm"], reference.threshold, rtol=1e-4)
    else:
        assert "clip_norm" not in logs
    # Recorded per-variable norms are those of the last step, before clipping.
    last_weights = _reference_training(
        _Reference(mode, **ref_kwargs), weights, x[:-BATCH], y[:-BATCH]
    )
    last_grads = _numpy_gradients(last_weights, x[-BATCH:], y[-BATCH:])
    norms = {k: float(v) for k, v in optimizer.variable_grad_norms().items()}
    assert [p.split("/", 1)[1] for p in norms] == [
        "hidden/kernel",
        "hidden/bias",
        "out/kernel",
        "out/bias",
    ]
    np.testing.assert_allclose(list(norms.values()), [_norm(g) for g in last_grads], rtol=1e-4)


def test_default_thresholds_work_as_they_stand():
    x, y = _data(batches=2)
    for mode in ("global_norm", "per_layer", "adaptive", "agc"):
        optimizer = GradientClip(keras.optimizers.SGD(LR), mode=mode)
        model = _model(optimizer, _initial_weights())
        history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert not np.allclose(model.get_weights()[0], _initial_weights()[0])
    assert GradientClip("sgd").clip_norm == 1.0
    assert GradientClip("sgd", mode="agc").clip_factor == 0.01
    adaptive = GradientClip("sgd", mode="adaptive")
    assert (adaptive.target_quantile, adaptive.quantile_learning_rate) == (0.5, 0.2)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_non_finite_leaves_weights_and_optimizer_state_unchanged(bad):
    x, y = _data(batches=2)
    optimizer = GradientClip(keras.optimizers.Adam(0.01), mode="global_norm")
    model = _model(optimizer, _initial_weights())
    model.train_on_batch(x[:BATCH], y[:BATCH])  # Adam slots now non-zero
    weights = [w.copy() for w in model.get_weights()]
    inner_state = [np.array(v) for v in optimizer.inner_optimizer.variables]
    iterations = int(optimizer.iterations)

    x_bad = x[BATCH:].copy()
    x_bad[3, 1] = bad
    model.train_on_batch(x_bad, y[BATCH:])

    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(inner_state, optimizer.inner_optimizer.variables, strict=True):
        np.testing.assert_array_equal(before, np.array(after))
    assert int(optimizer.iterations) == iterations
    logs = optimizer.step_logs()
    assert int(logs["skipped_steps"]) == 1
    assert not np.isfinite(float(logs["grad_norm"]))

    # A finite batch afterwards trains again.
    model.train_on_batch(x[BATCH:], y[BATCH:])
    assert int(optimizer.iterations) == iterations + 1
    assert not np.allclose(model.get_weights()[0], weights[0])
    assert int(optimizer.step_logs()["skipped_steps"]) == 1


def test_without_skip_non_finite_the_weights_are_corrupted():
    x, y = _data(batches=1)
    optimizer = GradientClip(keras.optimizers.SGD(LR), skip_non_finite=False)
    model = _model(optimizer, _initial_weights())
    x[0, 0] = np.nan
    model.train_on_batch(x, y)
    assert np.isnan(model.get_weights()[0]).any()
    assert int(optimizer.step_logs()["skipped_steps"]) == 0


def test_adaptive_threshold_ignores_non_finite_steps():
    x, y = _data(batches=1)
    optimizer = GradientClip(keras.optimizers.SGD(LR), mode="adaptive", clip_norm=2.0)
    model = _model(optimizer, _initial_weights())
    x[0, 0] = np.inf
    model.train_on_batch(x, y)
    assert float(optimizer.step_logs()["clip_norm"]) == pytest.approx(2.0)


def test_embedding_gradients_are_clipped():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, size=(8, 3))
    y = rng.normal(scale=50.0, size=(8, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    before = [w.copy() for w in model.get_weights()]
    model.compile(GradientClip(keras.optimizers.SGD(1.0), clip_norm=0.5), loss="mse")
    model.train_on_batch(ids, y)
    step = [b - a for b, a in zip(before, model.get_weights(), strict=True)]
    # SGD with learning rate 1: the update is the clipped gradient, of global norm 0.5.
    np.testing.assert_allclose(math.sqrt(sum(_norm(s) ** 2 for s in step)), 0.5, rtol=1e-4)


def test_delegates_learning_rate_and_iterations():
    inner = keras.optimizers.SGD(0.1)
    optimizer = GradientClip(inner)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.1)
    optimizer.learning_rate = 0.3
    np.testing.assert_allclose(float(inner.learning_rate), 0.3)
    model = _model(optimizer, _initial_weights())
    x, y = _data(batches=2)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    assert int(optimizer.iterations) == int(inner.iterations) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bogus"}, "mode"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": "big"}, "clip_norm"),
        ({"mode": "agc", "clip_norm": 1.0}, "not used by mode='agc'"),
        ({"mode": "agc", "clip_factor": 0.0}, "clip_factor"),
        ({"mode": "adaptive", "target_quantile": 1.5}, "target_quantile"),
        ({"mode": "per_layer", "group": "block"}, "group"),
        ({"auto_factor": 2.0}, "clip_norm='auto'"),
        ({"clip_norm": "auto", "auto_factor": 0.5}, "auto_factor"),
        ({"clip_norm": "auto", "ema_decay": 1.0}, "ema_decay"),
        ({"learning_rate": 0.1}, "wrapped optimizer"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientClip(keras.optimizers.SGD(), **kwargs)


def test_rejects_loss_scale_optimizer_and_non_optimizers():
    with pytest.raises(ValueError, match="LossScaleOptimizer"):
        GradientClip(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="optimizer"):
        GradientClip(42)


@pytest.mark.parametrize(("mode", "kwargs"), MODE_CASES, ids=lambda c: str(c))
def test_config_round_trip(mode, kwargs):
    optimizer = GradientClip(
        keras.optimizers.Adam(0.002), mode=mode, skip_non_finite=False, **kwargs
    )
    clone = assert_config_round_trip(optimizer)
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(float(clone.learning_rate), 0.002)
    assert clone.skip_non_finite is False


def test_statistics_survive_save_and_load(tmp_path):
    x, y = _data(batches=3)
    models = []
    for mode, kwargs in MODE_CASES:
        optimizer = GradientClip(keras.optimizers.Adam(0.01), mode=mode, **kwargs)
        model = _model(optimizer, _initial_weights())
        model.fit(x, y, batch_size=BATCH, verbose=0)
        models.append(model)

    # In this process: every optimizer variable (statistics, threshold, Adam slots) comes back.
    model = models[4]  # adaptive
    path = str(tmp_path / "adaptive.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, GradientClip)
    assert loaded.optimizer.mode == "adaptive"
    saved = [np.array(v) for v in model.optimizer.variables]
    restored = [np.array(v) for v in loaded.optimizer.variables]
    assert len(saved) == len(restored)
    for a, b in zip(saved, restored, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(loaded.optimizer.iterations) == 3

    # In a fresh process (one model per mode), and training continues after loading.
    chosen = [models[i] for i in (1, 3, 4, 5)]
    assert_saves_in_fresh_process(
        [(m, x[:BATCH]) for m in chosen], fit_after_load=[y[:BATCH]] * len(chosen)
    )


# ----------------------------------------------------------------------------- with DP-SGD


def test_under_dp_it_clips_the_noisy_average_gradient():
    from keras_safe.optimizers import DPSGD
    from keras_safe.privacy import make_private

    x, y = _data()
    weights = _initial_weights()
    reference = _Reference("global_norm", clip_norm=20.0)
    expected = _reference_training(reference, weights, x, y)
    # No noise and a per-example bound no example reaches: the DP gradient is the batch mean
    # gradient, which GradientClip then clips as without DP.
    dp = DPSGD(learning_rate=LR, l2_norm_clip=1e6, noise_multiplier=0.0)
    optimizer = GradientClip(dp, clip_norm=20.0)
    model = make_private(_model(optimizer, weights))
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # keras_safe's train step puts the clipping figures into the logs by itself.
    np.testing.assert_allclose(
        history.history["clip_fraction"][0], reference.clipped / reference.steps
    )
    np.testing.assert_allclose(history.history["grad_norm"][0], reference.last_norm, rtol=1e-4)
    assert dp.accounting_settings()["steps"] == 6


def test_under_dp_a_non_finite_example_is_dropped_before_clipping():
    from keras_safe.optimizers import DPSGD
    from keras_safe.privacy import make_private

    x, y = _data(batches=1)
    dp = DPSGD(learning_rate=LR, l2_norm_clip=1.0, noise_multiplier=1.0)
    optimizer = GradientClip(dp)
    model = make_private(_model(optimizer, _initial_weights()))
    x[2, 0] = np.nan
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    # DP-SGD drops the example whose gradient is not finite, so the step is not skipped
    # (a skip would reveal that example) and the weights stay finite.
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert int(optimizer.step_logs()["skipped_steps"]) == 0
    assert dp.accounting_settings()["steps"] == 1

    accumulating = DPSGD(
        learning_rate=LR, l2_norm_clip=1.0, noise_multiplier=1.0, gradient_accumulation_steps=2
    )
    model = make_private(_model(GradientClip(accumulating), _initial_weights()))
    with pytest.raises(ValueError, match="skip_non_finite=False"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
