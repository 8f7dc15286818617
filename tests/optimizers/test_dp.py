"""DP optimizers: clipping bound, noise scale (statistical), fresh noise, accumulation, saving."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD, DPAdam, DPOptimizer
from tests.testing import assert_config_round_trip, assert_saves_in_fresh_process

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


@pytest.mark.parametrize("sigma", [0.6, 1.3])
def test_noise_std_matches_lr_sigma_clip_over_batch(sigma):
    lr, clip, batch = 0.1, 2.0, 16
    model = _private(_linear(), DPSGD(lr, l2_norm_clip=clip, noise_multiplier=sigma, seed=3))
    # Zero inputs and targets: every gradient is zero, the update is pure noise.
    (update,) = _update(model, np.zeros((batch, 20)), np.zeros((batch, 50)))
    samples = update.ravel()
    expected = lr * sigma * clip / batch
    # 1000 samples: chi-square interval for the standard deviation at the 1e-6 level.
    n = samples.size
    low = expected * math.sqrt(stats.chi2.ppf(1e-6, n - 1) / (n - 1))
    high = expected * math.sqrt(stats.chi2.ppf(1 - 1e-6, n - 1) / (n - 1))
    std = samples.std(ddof=1)
    assert low < std < high
    # The same interval excludes 0.67x and 1.5x the right scale, so a wrong sigma fails.
    assert not low < 0.67 * std < high and not low < 1.5 * std < high
    assert abs(samples.mean()) < 5 * expected / math.sqrt(n)
    assert stats.kstest(samples / expected, "norm").pvalue > 1e-4


def test_noise_divides_by_expected_batch_size_not_the_padded_one():
    # Poisson batches are padded to a fixed number of rows; the divisor is the expected batch
    # size (64), not the rows of the padded batch.
    model = _private(_linear(), DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0))
    batches = keras_safe.privacy.poisson_batches(
        np.zeros((640, 20)), np.zeros((640, 50)), batch_size=64, epochs=0.1
    )
    rows = keras_safe.privacy.sampling.poisson_info(batches).max_batch_size
    assert rows > 100
    before = np.array(model.trainable_variables[0])
    model.fit(batches, verbose=0)
    update = before - np.array(model.trainable_variables[0])
    assert update.std() == pytest.approx(1.0 / 64, rel=0.15)


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


def test_gradient_accumulation_adds_one_noise_draw_per_update():
    lr, clip, sigma, batch, steps = 1.0, 1.0, 1.0, 8, 4
    inner = keras.optimizers.SGD(lr, gradient_accumulation_steps=steps)
    model = _private(_linear(), DPOptimizer(inner, l2_norm_clip=clip, noise_multiplier=sigma))
    x, y = np.zeros((batch * steps, 20)), np.zeros((batch * steps, 50))
    (update,) = _update(model, x, y, batch_size=batch)
    assert int(model.optimizer.iterations) == 1
    # One update over steps * batch examples with noise sigma * clip once.
    assert update.std() == pytest.approx(lr * sigma * clip / (steps * batch), rel=0.15)


def test_default_train_step_is_refused_not_trained_silently():
    model = _linear(4, 2)
    model.compile(optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0), loss="mse")
    before = [np.array(v) for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="make_private"):
        model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))


def test_custom_train_step_must_apply_the_dp_release():
    class TapeGradients(keras.Model):
        def train_step(self, data):
            x, y = data
            keras_safe.privacy.dp_gradients(self, x, y)  # computed, then not applied
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": tf.constant(0.0)}

    class Private(keras.Model):
        def train_step(self, data):
            x, y = data
            grads = keras_safe.privacy.dp_gradients(self, x, y)
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


def test_target_epsilon_calibrates_noise():
    opt = DPSGD(0.1, target_epsilon=2.0, num_examples=1000, batch_size=50, epochs=3, delta=1e-5)
    spent = keras_safe.privacy.compute_epsilon(
        num_examples=1000,
        batch_size=50,
        epochs=3,
        noise_multiplier=opt.noise_multiplier,
        delta=1e-5,
    )
    assert spent <= 2.0 + 1e-6
    assert spent > 1.9


def test_target_epsilon_with_microbatches_doubles_the_noise():
    settings = dict(target_epsilon=2.0, num_examples=1000, batch_size=50, epochs=3, delta=1e-5)
    per_example = DPSGD(0.1, **settings)
    microbatched = DPSGD(0.1, num_microbatches=10, **settings)
    assert microbatched.noise_multiplier == pytest.approx(2 * per_example.noise_multiplier)
    schedule = microbatched.schedule()
    assert schedule.accounted_noise == pytest.approx(per_example.noise_multiplier)
    assert schedule.sampling_rate == pytest.approx(0.05)


def test_configs_round_trip_and_models_save_in_a_fresh_process():
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
    assert_saves_in_fresh_process(cases, fit_after_load=targets)


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
    settings = dict(target_epsilon=2.0, num_examples=1000, batch_size=50, epochs=3, delta=1e-5)
    plain = DPSGD(0.1, **settings)
    accumulated = DPSGD(0.1, gradient_accumulation_steps=4, **settings)
    # Each of the 4 batches adds 1/2 of the noise, so the total noise is twice as large.
    assert accumulated.noise_multiplier == pytest.approx(2 * plain.noise_multiplier)
    schedule = accumulated.schedule()
    assert schedule.accounted_noise == pytest.approx(plain.noise_multiplier)
    assert schedule.sampling_rate == pytest.approx(0.05)
