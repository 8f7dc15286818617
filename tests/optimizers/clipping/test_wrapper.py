"""GradientClip as a wrapper: the non-finite guard, statistics, delegation, arguments, saving,
and the interplay with DP optimizers (post-processing of a release, refusing anything else)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe.optimizers import DPSGD, GradientClip
from keras_safe.optimizers.clipping import MODES, GlobalNormClip
from keras_safe.privacy import get_ledger, make_private
from tests.optimizers.clipping.reference import (
    BATCH,
    LR,
    data,
    initial_weights,
    model,
    norm,
    numpy_gradients,
    reference_training,
)
from tests.optimizers.clipping.test_global_norm import FixedReference
from tests.optimizers.test_dp import saved_dp_models
from tests.testing import assert_config_round_trip, assert_saves_in_fresh_process

MODE_CASES = [
    ("global_norm", {"clip_norm": 20.0}),
    ("global_norm", {"clip_norm": "auto", "auto_factor": 1.5, "ema_decay": 0.5}),
    ("per_layer", {"clip_norm": 8.0}),
    ("per_layer", {"clip_norm": 8.0, "group": "layer"}),
    ("adaptive", {"clip_norm": 12.0, "target_quantile": 0.5, "quantile_learning_rate": 0.4}),
    ("agc", {"clip_factor": 15.0, "epsilon": 1e-3}),
]


def test_every_mode_trains_with_its_defaults():
    x, y = data(batches=2)
    for mode in MODES:
        optimizer = GradientClip(keras.optimizers.SGD(LR), mode=mode)
        net = model(optimizer, initial_weights())
        history = net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert not np.allclose(net.get_weights()[0], initial_weights()[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_skip_non_finite_leaves_weights_and_optimizer_state_unchanged(bad):
    x, y = data(batches=2)
    optimizer = GradientClip(keras.optimizers.Adam(0.01), mode="global_norm")
    net = model(optimizer, initial_weights())
    net.train_on_batch(x[:BATCH], y[:BATCH])  # Adam slots now non-zero
    weights = [w.copy() for w in net.get_weights()]
    inner_state = [np.array(v) for v in optimizer.inner_optimizer.variables]
    iterations = int(optimizer.iterations)

    x_bad = x[BATCH:].copy()
    x_bad[3, 1] = bad
    net.train_on_batch(x_bad, y[BATCH:])

    for before, after in zip(weights, net.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(inner_state, optimizer.inner_optimizer.variables, strict=True):
        np.testing.assert_array_equal(before, np.array(after))
    assert int(optimizer.iterations) == iterations
    logs = optimizer.step_logs()
    assert int(logs["skipped_steps"]) == 1
    assert not np.isfinite(float(logs["grad_norm"]))

    # A finite batch afterwards trains again.
    net.train_on_batch(x[BATCH:], y[BATCH:])
    assert int(optimizer.iterations) == iterations + 1
    assert not np.allclose(net.get_weights()[0], weights[0])
    assert int(optimizer.step_logs()["skipped_steps"]) == 1


def test_without_skip_non_finite_the_weights_are_corrupted():
    x, y = data(batches=1)
    optimizer = GradientClip(keras.optimizers.SGD(LR), skip_non_finite=False)
    net = model(optimizer, initial_weights())
    x[0, 0] = np.nan
    net.train_on_batch(x, y)
    assert np.isnan(net.get_weights()[0]).any()
    assert int(optimizer.step_logs()["skipped_steps"]) == 0


def test_embedding_gradients_are_clipped():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, size=(8, 3))
    y = rng.normal(scale=50.0, size=(8, 1)).astype("float32")
    net = keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    before = [w.copy() for w in net.get_weights()]
    net.compile(GradientClip(keras.optimizers.SGD(1.0), clip_norm=0.5), loss="mse")
    net.train_on_batch(ids, y)
    step = [b - a for b, a in zip(before, net.get_weights(), strict=True)]
    # SGD with learning rate 1: the update is the clipped gradient, of global norm 0.5.
    np.testing.assert_allclose(math.sqrt(sum(norm(s) ** 2 for s in step)), 0.5, rtol=1e-4)


def test_delegates_learning_rate_and_iterations():
    inner = keras.optimizers.SGD(0.1)
    optimizer = GradientClip(inner)
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.1)
    optimizer.learning_rate = 0.3
    np.testing.assert_allclose(float(inner.learning_rate), 0.3)
    net = model(optimizer, initial_weights())
    x, y = data(batches=2)
    net.fit(x, y, batch_size=BATCH, verbose=0)
    assert int(optimizer.iterations) == int(inner.iterations) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bogus"}, "`mode` must be one of 'global_norm', 'per_layer'"),
        ({"learning_rate": 0.1}, "`learning_rate` .*wrapped optimizer"),
        ({"skip_non_finite": "no"}, "`skip_non_finite` must be True or False"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientClip(keras.optimizers.SGD(), **kwargs)


def test_rejects_loss_scale_optimizer_and_non_optimizers():
    with pytest.raises(ValueError, match="LossScaleOptimizer.*Fix: wrap the other way round"):
        GradientClip(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()))
    with pytest.raises(ValueError, match="`inner_optimizer` must be a keras.optimizers.Optimizer"):
        GradientClip(42)
    with pytest.raises(ValueError, match="`optimizer` must be given as inner_optimizer"):
        GradientClip(optimizer=keras.optimizers.SGD())


def test_apply_without_variables_before_build_names_the_fix():
    optimizer = GradientClip(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="`trainable_variables`.*optimizer.build"):
        optimizer.apply([tf.ones(2)])
    with pytest.raises(ValueError, match="`grads` must be one gradient per variable"):
        optimizer.apply([tf.ones(2)], [keras.Variable(np.ones(2)), keras.Variable(np.ones(2))])


@pytest.mark.parametrize(("mode", "kwargs"), MODE_CASES, ids=lambda c: str(c))
def test_config_round_trip(mode, kwargs):
    optimizer = GradientClip(
        keras.optimizers.Adam(0.002), mode=mode, skip_non_finite=False, **kwargs
    )
    clone = assert_config_round_trip(optimizer)
    assert isinstance(clone.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(float(clone.learning_rate), 0.002)
    assert clone.skip_non_finite is False
    assert clone.get_config() == {
        "name": optimizer.name,
        "inner_optimizer": keras.saving.serialize_keras_object(optimizer.inner_optimizer),
        "mode": mode,
        **clone.rule.get_config(),
        "skip_non_finite": False,
    }
    for key, value in kwargs.items():
        assert clone.get_config()[key] == value


def test_configs_written_by_keras_safe_0_1_0_load():
    # 0.1.0 listed every mode's arguments, None for those the mode does not read.
    unused = dict.fromkeys(
        [
            "clip_norm",
            "group",
            "target_quantile",
            "quantile_learning_rate",
            "clip_factor",
            "epsilon",
            "auto_factor",
            "ema_decay",
        ]
    )
    inner = keras.saving.serialize_keras_object(keras.optimizers.SGD(0.1))
    base = {"name": "gradient_clip", "optimizer": inner, "skip_non_finite": True, **unused}
    cases = [
        ({"mode": "global_norm", "clip_norm": 2.0}, "GlobalNormClip(clip_norm=2.0)"),
        (
            {"mode": "global_norm", "clip_norm": "auto", "auto_factor": 3.0, "ema_decay": 0.9},
            "AutoGlobalNormClip(clip_norm='auto', auto_factor=3.0, ema_decay=0.9)",
        ),
        (
            {"mode": "per_layer", "clip_norm": 1.0, "group": "layer"},
            "PerLayerClip(clip_norm=1.0, group='layer')",
        ),
        (
            {
                "mode": "adaptive",
                "clip_norm": 1.0,
                "target_quantile": 0.7,
                "quantile_learning_rate": 0.2,
            },
            "AdaptiveClip(clip_norm=1.0, target_quantile=0.7, quantile_learning_rate=0.2)",
        ),
        (
            {"mode": "agc", "clip_factor": 0.02, "epsilon": 0.001},
            "AGCClip(clip_factor=0.02, epsilon=0.001)",
        ),
    ]
    for changes, rule in cases:
        config = {**base, **changes}
        loaded = keras.saving.deserialize_keras_object(
            {
                "module": "keras_safe.optimizers.clipping",
                "class_name": "GradientClip",
                "config": config,
                "registered_name": "keras_safe>GradientClip",
            }
        )
        assert repr(loaded.rule) == rule
        assert float(loaded.learning_rate) == pytest.approx(0.1)


def test_statistics_survive_save_and_load(tmp_path):
    x, y = data(batches=3)
    models = []
    for mode, kwargs in MODE_CASES:
        optimizer = GradientClip(keras.optimizers.Adam(0.01), mode=mode, **kwargs)
        net = model(optimizer, initial_weights())
        net.fit(x, y, batch_size=BATCH, verbose=0)
        models.append(net)

    # In this process: every optimizer variable (statistics, threshold, Adam slots) comes back.
    for index in (1, 4):  # the two rules with state: auto global norm, adaptive
        net = models[index]
        path = str(tmp_path / f"model_{index}.keras")
        net.save(path)
        loaded = keras.saving.load_model(path)
        assert isinstance(loaded.optimizer, GradientClip)
        assert loaded.optimizer.mode == MODE_CASES[index][0]
        saved = [np.array(v) for v in net.optimizer.variables]
        restored = [np.array(v) for v in loaded.optimizer.variables]
        assert len(saved) == len(restored)
        for a, b in zip(saved, restored, strict=True):
            np.testing.assert_array_equal(a, b)
        assert int(loaded.optimizer.iterations) == 3
        np.testing.assert_allclose(
            float(loaded.optimizer.step_logs()["clip_norm"]),
            float(net.optimizer.step_logs()["clip_norm"]),
        )

    # In a fresh process (one model per mode), and training continues after loading; the DP
    # optimizers' models of tests/optimizers/test_dp.py load in the same process.
    chosen = [models[i] for i in (1, 3, 4, 5)]
    dp_cases, dp_targets = saved_dp_models()
    assert_saves_in_fresh_process(
        [(m, x[:BATCH]) for m in chosen] + dp_cases,
        fit_after_load=[y[:BATCH]] * len(chosen) + dp_targets,
    )


# ----------------------------------------------------------------------------- with DP-SGD


def _dp(**kwargs):
    return DPSGD(learning_rate=LR, **{"l2_norm_clip": 1.0, "noise_multiplier": 1.0, **kwargs})


def test_under_dp_it_clips_the_noisy_average_gradient():
    x, y = data()
    weights = initial_weights()
    reference = FixedReference(20.0)
    expected = reference_training(reference, weights, x, y)
    # No noise and a per-example bound no example reaches: the DP gradient is the batch mean
    # gradient, which GradientClip then clips as without DP.
    dp = _dp(l2_norm_clip=1e6, noise_multiplier=0.0)
    optimizer = GradientClip(dp, clip_norm=20.0)
    net = make_private(model(optimizer, weights))
    history = net.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(net.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # keras_safe's train step puts the clipping figures into the logs by itself.
    np.testing.assert_allclose(
        history.history["clip_fraction"][0], reference.clipped / reference.steps
    )
    np.testing.assert_allclose(history.history["grad_norm"][0], reference.last_norm, rtol=1e-4)
    assert int(dp.iterations) == 6


def test_under_dp_a_chain_of_clips_passes_the_release_on():
    # Each GradientClip's output is post-processing of the release: the next one and the DP
    # optimizer accept it. Outer per-layer clip at 0.5, inner global clip at 20: without noise
    # and per-example clipping, each step is the batch gradient clipped twice.
    x, y = data(batches=2)
    weights = initial_weights()
    dp = _dp(l2_norm_clip=1e6, noise_multiplier=0.0)
    optimizer = GradientClip(GradientClip(dp, clip_norm=20.0), mode="per_layer", clip_norm=0.5)
    net = make_private(model(optimizer, weights))
    net.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    w = [v.astype(np.float64) for v in weights]
    for start in (0, BATCH):
        grads = numpy_gradients(w, x[start : start + BATCH], y[start : start + BATCH])
        grads = [g * min(1.0, 0.5 / norm(g)) for g in grads]
        total = math.sqrt(sum(norm(g) ** 2 for g in grads))
        grads = [g * min(1.0, 20.0 / total) for g in grads]
        w = [a - LR * g for a, g in zip(w, grads, strict=True)]
    for got, want in zip(net.get_weights(), w, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_under_dp_a_non_finite_example_is_dropped_before_clipping():
    x, y = data(batches=1)
    dp = _dp()
    optimizer = GradientClip(dp)
    net = make_private(model(optimizer, initial_weights()))
    x[2, 0] = np.nan
    net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    # DP-SGD drops the example whose gradient is not finite, so the step is not skipped
    # (a skip would reveal that example) and the weights stay finite.
    assert all(np.all(np.isfinite(w)) for w in net.get_weights())
    assert int(optimizer.step_logs()["skipped_steps"]) == 0
    assert int(dp.iterations) == 1


def test_under_dp_gradient_accumulation_is_supported():
    # The privacy ledger is charged where the noise is drawn, not from `iterations`, so the
    # non-finite guard needs no restriction on gradient accumulation.
    x, y = data(batches=4)
    dp = _dp(gradient_accumulation_steps=2)
    optimizer = GradientClip(dp)
    net = make_private(model(optimizer, initial_weights()))
    net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert int(dp.iterations) == 2  # Keras counts updates: one per two batches
    assert int(optimizer.steps) == 4 and int(optimizer.step_logs()["skipped_steps"]) == 0
    assert not np.allclose(net.get_weights()[0], initial_weights()[0])


class _NaNPenalty(keras.regularizers.Regularizer):
    """A weight penalty whose value and gradient are NaN, to force a non-finite release."""

    def __call__(self, weights):
        return keras.ops.sqrt(keras.ops.sum(weights * 0.0) - 1.0)


def test_under_dp_a_skipped_step_is_still_charged_to_the_ledger():
    # The release is noised and charged before GradientClip sees it; adding a NaN weight
    # penalty (post-processing) makes it non-finite, so GradientClip drops the step.
    x, y = data(batches=2)
    dp = _dp()
    optimizer = GradientClip(dp)
    net = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer=_NaNPenalty())]
    )
    net.compile(optimizer=optimizer, loss="mse")
    before = [w.copy() for w in net.get_weights()]
    make_private(net).fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    for got, want in zip(net.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(optimizer.step_logs()["skipped_steps"]) == 2
    assert int(dp.iterations) == 0
    assert get_ledger(net).steps == 2


@pytest.mark.parametrize("depth", [1, 2])
def test_under_dp_without_make_private_fit_raises_the_clear_error(depth):
    x, y = data(batches=1)
    optimizer = _dp()
    for _ in range(depth):
        optimizer = GradientClip(optimizer)
    net = model(optimizer, initial_weights())
    with pytest.raises(RuntimeError, match="make_private") as error:
        net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    message = str(error.value)
    assert message.startswith("GradientClip(DPSGD) received gradients"), message
    assert "Cond" not in message and "cond" not in message
    for got, want in zip(net.get_weights(), initial_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_under_dp_tape_gradients_are_refused_and_nothing_moves():
    x, y = data(batches=1)
    optimizer = GradientClip(_dp(), clip_norm=1.0)
    net = model(optimizer, initial_weights())
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y, net(x))
    grads = tape.gradient(loss, net.trainable_variables)
    with pytest.raises(RuntimeError, match="not the DP release|did not go through"):
        optimizer.apply(grads, net.trainable_variables)
    for got, want in zip(net.get_weights(), initial_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert optimizer.step_logs() == {}  # refused before anything was built or counted
    assert isinstance(optimizer.rule, GlobalNormClip)
