"""DP optimizers: clipping bound, fresh noise, calibration (against dp-accounting), saving.

The scale of the noise is measured in `test_noise_statistics.py`.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD, DPAdam, DPOptimizer
from tests import dp_reference
from tests.testing import assert_config_round_trip

RNG = np.random.default_rng(0)


def _linear(inputs=20, units=50, bias=False):
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(units, use_bias=bias)])


def _private(model, optimizer, loss="mse"):
    model.compile(optimizer=optimizer, loss=loss)
    return keras_safe.privacy.make_private(model)


def _update(model, x, y, batch_size=None):
    before = [np.array(v) for v in model.trainable_variables]
    model.fit(x, y, batch_size=batch_size or len(x), epochs=1, shuffle=False, verbose=0)
    return [b - np.array(v) for b, v in zip(before, model.trainable_variables)]


def test_huge_gradient_single_example_update_has_norm_lr_times_clip():
    model = _private(_linear(4, 3, bias=True), DPSGD(0.5, l2_norm_clip=0.7, noise_multiplier=0.0))
    x, y = np.full((1, 4), 100.0), np.full((1, 3), -1e4)
    update = _update(model, x, y)
    norm = math.sqrt(sum(float(np.sum(u.astype("float64") ** 2)) for u in update))
    assert norm == pytest.approx(0.5 * 0.7, rel=1e-5)


def test_noise_is_fresh_each_step_and_reproducible_only_with_an_explicit_seed():
    def two_updates(seed=None):
        keras.utils.set_random_seed(42)
        optimizer = DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, seed=seed)
        model = _private(_linear(), optimizer)
        x, y = np.zeros((8, 20)), np.zeros((8, 50))
        return _update(model, x, y)[0], _update(model, x, y)[0]

    first, second = two_updates()
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.2
    # The global seed alone does not make the noise reproducible (an attacker who knows it
    # could subtract the noise): the same global seed gives independent noise.
    again_first, _ = two_updates()
    assert abs(np.corrcoef(first.ravel(), again_first.ravel())[0, 1]) < 0.2
    # An explicit seed does (for debugging), and the ledger marks those steps as seeded.
    seeded_first, _ = two_updates(seed=11)
    np.testing.assert_array_equal(seeded_first, two_updates(seed=11)[0])


def test_noise_continues_after_reload(tmp_path):
    keras.utils.set_random_seed(7)
    model = _private(_linear(), DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0))
    x, y = np.zeros((8, 20)), np.zeros((8, 50))
    first = _update(model, x, y)[0]
    model.save(tmp_path / "m.keras")
    keras.utils.set_random_seed(7)  # the same seed again must not replay the first draw
    reloaded = keras_safe.privacy.make_private(keras.saving.load_model(tmp_path / "m.keras"))
    assert int(reloaded.optimizer.iterations) == 1
    second = _update(reloaded, x, y)[0]
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.2


def test_default_train_step_is_refused_not_trained_silently():
    model = _linear(4, 2)
    model.compile(optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0), loss="mse")
    before = [np.array(v) for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="make_private"):
        model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))


def test_custom_train_step_must_apply_the_dp_release():
    # A private fit hands the step Poisson batches drawn from the arrays, with sample weights.
    class TapeGradients(keras.Model):
        def train_step(self, data):
            x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
            keras_safe.privacy.dp_gradients(self, x, y, weights)  # computed, then not applied
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": tf.constant(0.0)}

    class Private(keras.Model):
        def train_step(self, data):
            x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
            grads = keras_safe.privacy.dp_gradients(self, x, y, weights)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": tf.constant(0.0)}

    x, y = np.ones((8, 3)), np.ones((8, 1))
    for cls, ok in ((TapeGradients, False), (Private, True)):
        inputs = keras.Input((3,))
        model = cls(inputs, keras.layers.Dense(1)(inputs))
        model = _private(model, DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0))
        before = [np.array(v) for v in model.trainable_variables]
        if ok:
            model.fit(x, y, batch_size=4, verbose=0)
            assert keras_safe.privacy.get_ledger(model).steps == 2
        else:
            with pytest.raises(RuntimeError, match="not the DP release"):
                model.fit(x, y, batch_size=4, verbose=0)
            for b, v in zip(before, model.trainable_variables):
                np.testing.assert_array_equal(b, np.array(v))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"l2_norm_clip": 0.0, "noise_multiplier": 1.0}, "l2_norm_clip"),
        ({"l2_norm_clip": -1.0, "noise_multiplier": 1.0}, "l2_norm_clip"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "num_microbatches": 0}, "num_microbatches"),
        ({"noise_multiplier": 1.0, "num_microbatches": 2.5}, "num_microbatches"),
        ({}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "delta"),
        ({"noise_multiplier": 1.0, "batch_size": 100, "num_examples": 10}, "batch_size"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0, "seed": -3}, "seed"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, "accountant"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DPSGD(0.1, **kwargs)


# The calibration plan of the next tests: 3 epochs of 1000 examples in batches of 50, that is
# 60 batches at sampling rate 0.05; their epsilon is computed with dp-accounting directly.
PLAN = dict(target_epsilon=2.0, num_examples=1000, batch_size=50, epochs=3, delta=1e-5)


def _reference_epsilon(accounted_noise):
    return dp_reference.epsilon(accounted_noise, 0.05, 60, 1e-5)


def test_target_epsilon_calibrates_noise():
    opt = DPSGD(0.1, **PLAN)
    assert _reference_epsilon(opt.noise_multiplier) <= 2.0
    # The least noise that meets the target: 0.1% less would overspend.
    assert _reference_epsilon(opt.noise_multiplier * 0.999) > 2.0


def test_target_epsilon_with_microbatches_doubles_the_noise():
    per_example = DPSGD(0.1, **PLAN)
    microbatched = DPSGD(0.1, num_microbatches=10, **PLAN)
    assert microbatched.noise_multiplier == pytest.approx(2 * per_example.noise_multiplier)
    # A microbatch's clipped mean moves by up to 2 C when one example joins or leaves: the
    # Gaussian mechanism of noise sigma * C then has the multiplier sigma / 2.
    assert _reference_epsilon(microbatched.noise_multiplier / 2) <= 2.0
    schedule = microbatched.schedule()
    assert schedule.accounted_noise == pytest.approx(per_example.noise_multiplier)
    assert schedule.sampling_rate == pytest.approx(0.05)


def saved_dp_models():
    """Four DP optimizers (their configs round-trip) on models trained one step, as
    `(cases, targets)` for `assert_saves_in_fresh_process`.

    They are saved and loaded in a fresh process (and train on there) by
    `tests/optimizers/clipping/test_wrapper.py::test_statistics_survive_save_and_load`, in the
    one process that also loads GradientClip's models: TensorFlow starts once for both.
    """
    optimizers = [
        DPSGD(0.05, momentum=0.9, l2_norm_clip=1.5, noise_multiplier=1.1, num_microbatches=2),
        DPAdam(1e-3, beta_1=0.8, l2_norm_clip=1.0, noise_multiplier=0.9, seed=5),
        DPOptimizer(keras.optimizers.RMSprop(0.01), l2_norm_clip=2.0, noise_multiplier=1.3),
        DPSGD(
            keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
        ),
    ]
    cases, targets = [], []
    for optimizer in optimizers:
        assert_config_round_trip(optimizer)
        model = _private(_linear(4, 2, bias=True), optimizer)
        x, y = RNG.normal(size=(8, 4)).astype("float32"), RNG.normal(size=(8, 2))
        model.fit(x, y, batch_size=4, verbose=0)
        cases.append((model, x))
        targets.append(y)
    return cases, targets


def test_the_wrapped_optimizer_is_inner_optimizer_and_0_2_0_configs_load():
    optimizer = DPOptimizer(inner_optimizer="adam", l2_norm_clip=2.0, noise_multiplier=1.3)
    config = optimizer.get_config()
    assert config["inner_optimizer"]["class_name"] == "Adam" and "optimizer" not in config
    legacy = {**config, "optimizer": config["inner_optimizer"]}
    del legacy["inner_optimizer"]  # keras_safe 0.2.0 named it "optimizer"
    loaded = DPOptimizer.from_config(legacy)
    assert isinstance(loaded.inner_optimizer, keras.optimizers.Adam)
    assert loaded.get_config() == config
    with pytest.raises(ValueError, match="`optimizer` must be given as inner_optimizer"):
        DPOptimizer(optimizer="adam", noise_multiplier=1.0)


def test_learning_rate_callbacks_reach_the_wrapped_optimizer():
    optimizer = DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0)
    model = _private(_linear(4, 2), optimizer)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.01)
    model.fit(np.ones((8, 4)), np.ones((8, 2)), callbacks=[schedule], verbose=0)
    assert float(optimizer.inner_optimizer.learning_rate) == pytest.approx(0.01)


def _pure_noise_update(**kwargs):
    model = _private(_linear(), DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, **kwargs))
    return _update(model, np.zeros((8, 20)), np.zeros((8, 50)))[0]


def test_different_seeds_and_unseeded_runs_draw_different_noise():
    first, second = _pure_noise_update(), _pure_noise_update()
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.2
    a, b = _pure_noise_update(seed=1), _pure_noise_update(seed=2)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.2
    np.testing.assert_allclose(a, _pure_noise_update(seed=1), atol=1e-6)


def test_saved_model_does_not_hold_the_noise_seed():
    optimizer = DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, seed=None)
    _private(_linear(), optimizer)
    optimizer.build(_linear().trainable_variables)
    names = [v.name for v in optimizer.variables]
    assert "noise_draws" in names and not any("seed" in n for n in names)
    assert optimizer.get_config()["seed"] is None


def test_data_dependent_add_loss_is_refused():
    class Penalised(keras.layers.Layer):
        def call(self, x):
            self.add_loss(keras.ops.mean(keras.ops.square(x)))
            return x

    model = keras.Sequential([keras.Input((4,)), Penalised(), keras.layers.Dense(2)])
    model = _private(model, DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0))
    with pytest.raises(PrivacyError, match="add_loss"):
        model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)


def test_mixed_float16_loss_scaling_is_refused():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = _private(_linear(4, 2), DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0))
        with pytest.raises(PrivacyError, match="mixed_bfloat16"):
            model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_gaussian_noise_is_standard_normal():
    from keras_safe.optimizers.noise import gaussian_noise

    z = gaussian_noise(400_001, np.array([3, 9], "int64")).numpy().astype("float64")
    assert z.shape == (400_001,)
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # The two halves (cosine and sine branches) are uncorrelated.
    half = z.size // 2
    assert abs(np.corrcoef(z[:half], z[half : 2 * half])[0, 1]) < 5 / np.sqrt(half)


def test_mixed_bfloat16_trains():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(3, dtype="float32"),
            ]
        )
        model = _private(
            model,
            DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(RNG.random((32, 8)), RNG.integers(0, 3, 32), epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert all(v.dtype == "float32" for v in model.trainable_variables)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_gradient_accumulation_is_accounted_per_batch():
    plain = DPSGD(0.1, **PLAN)
    accumulated = DPSGD(0.1, gradient_accumulation_steps=4, **PLAN)
    # Each of the 4 batches adds 1/2 of the noise, so the total noise is twice as large.
    assert accumulated.noise_multiplier == pytest.approx(2 * plain.noise_multiplier)
    # Each batch is a Gaussian mechanism with noise multiplier sigma / sqrt(4), 60 batches.
    assert _reference_epsilon(accumulated.noise_multiplier / 2) <= 2.0
    schedule = accumulated.schedule()
    assert schedule.accounted_noise == pytest.approx(plain.noise_multiplier)
    assert schedule.sampling_rate == pytest.approx(0.05)
