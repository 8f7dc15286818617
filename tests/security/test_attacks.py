"""Evasion attacks on a digits MLP, checked against closed forms and hand-written loops."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import ArgumentError
from keras_safe.layers import PredictionRounding, TopKOnly
from keras_safe.security import (
    APGD,
    FGSM,
    PGD,
    RandomNoise,
    Square,
    apgd,
    evasion_attack_names,
    fgsm,
    pgd,
    random_noise,
    square,
)
from keras_safe.security._common import output_kind
from keras_safe.security.attacks.auto_pgd import checkpoints
from keras_safe.security.attacks.registry import make_attack
from keras_safe.training.state import safe_state
from tests.security.conftest import accuracy, digits, predict_labels

RANGE = {"clip_min": 0.0, "clip_max": 1.0}


def _norms(x_adv, x, norm):
    d = (np.asarray(x_adv, np.float64) - x).reshape(len(x), -1)
    return np.abs(d).max(axis=1) if norm == "linf" else np.linalg.norm(d, axis=1)


@pytest.mark.parametrize("norm, epsilon", [("linf", 0.15), ("l2", 1.1)])
def test_accuracy_pgd_below_fgsm_below_noise_below_clean(trained_mlp, norm, epsilon):
    x, y = digits()
    x, y = x[1200:], y[1200:]  # every held-out digit (597): finer accuracy steps
    clean = accuracy(trained_mlp, x, y)
    noise = accuracy(
        trained_mlp, random_noise(trained_mlp, x, y, epsilon, norm=norm, seed=0, **RANGE), y
    )
    one_step = accuracy(trained_mlp, fgsm(trained_mlp, x, y, epsilon, norm=norm, **RANGE), y)
    iterative = accuracy(
        trained_mlp, pgd(trained_mlp, x, y, epsilon, norm=norm, seed=0, **RANGE), y
    )
    assert iterative < one_step < noise < clean, (iterative, one_step, noise, clean)
    assert clean - iterative > 0.3  # the attack matters at this budget


@pytest.mark.parametrize("norm, epsilon", [("linf", 0.1), ("l2", 0.8)])
@pytest.mark.parametrize("name", sorted(evasion_attack_names()))
def test_every_attack_stays_in_the_ball_and_the_range(
    trained_mlp, digits_split, name, norm, epsilon
):
    _, (x, y) = digits_split
    x = x[:100]
    settings = {"steps": 5} if name in ("pgd", "apgd") else {}
    if name == "square":
        settings = {"queries": 50}
    x_adv = make_attack(name, epsilon=epsilon, norm=norm, seed=1, **RANGE, **settings).generate(
        trained_mlp, x, y[:100]
    )
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert _norms(x_adv, x, norm).max() <= epsilon * (1 + 1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # The attacks use their budget: the typical perturbation is of the size of epsilon.
    assert np.median(_norms(x_adv, x, norm)) > 0.5 * epsilon


def test_per_feature_input_range_is_respected(trained_mlp, digits_split):
    _, (x, y) = digits_split
    low = np.where(np.arange(64) % 2 == 0, 0.0, 0.2).astype("float32")
    high = np.where(np.arange(64) % 3 == 0, 0.9, 1.0).astype("float32")
    x = np.clip(x[:64], low, high)
    for attack in (
        PGD(0.3, steps=5, clip_min=low, clip_max=high),
        Square(0.3, queries=30, clip_min=low, clip_max=high),
    ):
        x_adv = attack.generate(trained_mlp, x, y[:64])
        assert np.all(x_adv >= low) and np.all(x_adv <= high)
        assert np.abs(x_adv - x).max() <= 0.3 + 1e-6


def test_fgsm_matches_the_closed_form_gradient_of_a_linear_model():
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(6, 4)).astype("float32"), rng.normal(size=4).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.layers[0].set_weights([w, b])
    x = rng.uniform(0.2, 0.8, size=(20, 6)).astype("float32")
    y = rng.integers(0, 4, size=20)
    # d CE / d x = W (softmax(z) - onehot(y)) for z = x W + b
    z = x.astype(np.float64) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(4)[y]) @ w.T.astype(np.float64)
    expected = np.clip(x + 0.1 * np.sign(grad), 0.0, 1.0)
    np.testing.assert_allclose(fgsm(model, x, y, 0.1, **RANGE), expected, atol=1e-6)
    # Targeted: a step down the cross-entropy of the target.
    target = (y + 1) % 4
    grad_t = (p - np.eye(4)[target]) @ w.T.astype(np.float64)
    expected_t = np.clip(x - 0.1 * np.sign(grad_t), 0.0, 1.0)
    np.testing.assert_allclose(
        fgsm(model, x, target, 0.1, targeted=True, **RANGE), expected_t, atol=1e-6
    )
    # L2: a step of length epsilon along the gradient.
    unit = grad / np.linalg.norm(grad, axis=1, keepdims=True)
    np.testing.assert_allclose(fgsm(model, x, y, 0.1, norm="l2"), x + 0.1 * unit, atol=1e-6)


def _pgd_one_at_a_time(model, x, y, epsilon, step, steps):
    """Madry's PGD from x, written out per example with a plain GradientTape."""
    out = []
    for xi, yi in zip(x, y):
        x0 = tf.constant(xi[None])
        xa = x0
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(xa)
                loss = keras.losses.sparse_categorical_crossentropy(
                    np.array([yi]), model(xa), from_logits=True
                )
            xa = xa + step * tf.sign(tape.gradient(loss, xa))
            xa = tf.clip_by_value(tf.clip_by_value(xa, x0 - epsilon, x0 + epsilon), 0.0, 1.0)
        out.append(xa.numpy()[0])
    return np.stack(out)


def test_pgd_matches_a_one_example_at_a_time_loop(trained_mlp, digits_split):
    _, (x, y) = digits_split
    x, y = x[:40], y[:40]
    got = pgd(
        trained_mlp, x, y, 0.1, step_size=0.02, steps=7, random_start=False, batch_size=16, **RANGE
    )
    want = _pgd_one_at_a_time(trained_mlp, x, y, 0.1, 0.02, 7)
    # A gradient coordinate within rounding of 0 may take the other sign: allow a few.
    assert np.mean(np.abs(got - want) > 1e-5) < 0.005
    assert accuracy(trained_mlp, got, y) == accuracy(trained_mlp, want, y)


@pytest.mark.parametrize("norm, epsilon", [("linf", 0.08), ("l2", 0.6)])
def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_budget(
    trained_mlp, digits_split, norm, epsilon
):
    _, (x, y) = digits_split
    with_pgd = accuracy(
        trained_mlp, pgd(trained_mlp, x, y, epsilon, steps=20, norm=norm, seed=0, **RANGE), y
    )
    with_apgd = accuracy(
        trained_mlp, apgd(trained_mlp, x, y, epsilon, steps=20, norm=norm, seed=0, **RANGE), y
    )
    assert with_apgd <= with_pgd, (with_apgd, with_pgd)


def test_apgd_checkpoints_follow_the_paper():
    # Croce & Hein 2020: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of 100 steps.
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9]


def test_apgd_dlr_loss_and_restarts(trained_mlp, digits_split):
    _, (x, y) = digits_split
    one = accuracy(
        trained_mlp,
        APGD(0.08, steps=10, loss="dlr", seed=0, **RANGE).generate(trained_mlp, x, y),
        y,
    )
    assert one < accuracy(trained_mlp, x, y) - 0.2
    with pytest.raises(ArgumentError, match="`loss`"):
        APGD(0.1, loss="dlr", targeted=True)


def test_restarts_keep_the_best_run_per_example(trained_mlp, digits_split):
    _, (x, y) = digits_split
    settings = dict(steps=3, step_size=0.03, seed=0, **RANGE)
    single = predict_labels(trained_mlp, PGD(0.08, **settings).generate(trained_mlp, x, y)) != y
    several = (
        predict_labels(trained_mlp, PGD(0.08, restarts=4, **settings).generate(trained_mlp, x, y))
        != y
    )
    assert several.mean() >= single.mean()


def test_targeted_attacks_reach_the_target(trained_mlp, digits_split):
    _, (x, y) = digits_split
    target = (y + 3) % 10
    x_adv = pgd(trained_mlp, x, target, 0.3, steps=20, targeted=True, seed=0, **RANGE)
    reached = np.mean(predict_labels(trained_mlp, x_adv) == target)
    untargeted = pgd(trained_mlp, x, y, 0.3, steps=20, seed=0, **RANGE)
    by_chance = np.mean(predict_labels(trained_mlp, untargeted) == target)
    assert reached > 0.9 and by_chance < 0.5
    with pytest.raises(ArgumentError, match="`y`"):
        pgd(trained_mlp, x, None, 0.1, targeted=True)


def test_probability_outputs_are_detected_and_attacked_like_logits(trained_mlp, digits_split):
    _, (x, y) = digits_split
    x, y = x[:60], y[:60]
    probabilities = keras.Sequential(
        [keras.Input((64,)), *trained_mlp.layers, keras.layers.Softmax()]
    )
    settings = dict(steps=5, step_size=0.02, random_start=False, **RANGE)
    on_logits = pgd(trained_mlp, x, y, 0.1, **settings)
    detected = pgd(probabilities, x, y, 0.1, **settings)
    declared = pgd(probabilities, x, y, 0.1, from_logits=False, **settings)
    assert np.mean(np.abs(detected - on_logits) > 1e-5) < 0.01
    np.testing.assert_array_equal(detected, declared)
    # Softmax outputs behind an output defence (rows no longer sum to 1) are probabilities too.
    for defence in (TopKOnly(k=1), PredictionRounding(decimals=1)):
        served = keras.Sequential([keras.Input((64,)), probabilities, defence])
        assert output_kind(served, served(x)) == "probabilities"
    assert output_kind(trained_mlp, trained_mlp(x)) == "logits"


def test_numpy_tensor_and_dataset_inputs_give_the_same_examples(trained_mlp, digits_split):
    _, (x, y) = digits_split
    x, y = x[:50], y[:50]
    attack = PGD(0.1, steps=4, random_start=False, batch_size=20, **RANGE)
    from_numpy = attack.generate(trained_mlp, x, y)
    from_tensor = attack.generate(trained_mlp, tf.constant(x), tf.constant(y))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    from_dataset = attack.generate(trained_mlp, dataset)
    assert tf.is_tensor(from_tensor) and isinstance(from_numpy, np.ndarray)
    np.testing.assert_allclose(from_tensor.numpy(), from_numpy, atol=1e-6)
    np.testing.assert_allclose(from_dataset, from_numpy, atol=1e-6)
    # One-hot labels mean the same classes.
    np.testing.assert_allclose(
        attack.generate(trained_mlp, x, np.eye(10)[y]), from_numpy, atol=1e-6
    )
    # Without labels, untargeted attacks push away from the model's own predictions.
    unlabeled = attack.generate(trained_mlp, x)
    np.testing.assert_allclose(
        unlabeled, attack.generate(trained_mlp, x, predict_labels(trained_mlp, x)), atol=1e-6
    )


def test_binary_sigmoid_classifier(digits_split):
    (x, y), (xt, yt) = digits_split
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    model.fit(x, (y >= 5).astype("float32"), epochs=8, batch_size=64, verbose=0)
    labels = (yt >= 5).astype("float32")

    def acc(inputs):
        return float(np.mean((model.predict(inputs, verbose=0)[:, 0] > 0.5) == labels))

    x_adv = pgd(model, xt, labels, 0.2, steps=10, seed=0, **RANGE)
    assert np.abs(x_adv - xt).max() <= 0.2 + 1e-6
    assert acc(x_adv) < acc(xt) - 0.3


def test_square_on_images_stays_in_the_ball_and_lowers_accuracy():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=30, verbose=0)
    for norm, epsilon in (("linf", 0.1), ("l2", 1.0)):
        x_adv = square(model, x, y, epsilon, queries=200, norm=norm, seed=0, **RANGE)
        assert _norms(x_adv, x, norm).max() <= epsilon * (1 + 1e-5)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert accuracy(model, x_adv, y) < accuracy(model, x, y)


def test_compiled_graphs_are_reused_across_epsilons_and_steps(trained_mlp, digits_split):
    _, (x, y) = digits_split
    pgd(trained_mlp, x[:10], y[:10], 0.1, steps=2)
    count = len(safe_state(trained_mlp).attack_graphs)
    for epsilon, steps in ((0.05, 3), (0.2, 5)):
        pgd(trained_mlp, x[:30], y[:30], epsilon, steps=steps)
    assert len(safe_state(trained_mlp).attack_graphs) == count
    traced = [
        f.experimental_get_tracing_count() for f in safe_state(trained_mlp).attack_graphs.values()
    ]
    assert max(traced) == 1


def test_attack_config_round_trip():
    for attack in (
        FGSM(0.1, norm="l2"),
        PGD(0.1, steps=7, restarts=2, clip_min=0.0, clip_max=1.0),
        APGD(0.2, steps=9, loss="dlr"),
        Square(0.05, queries=10),
        RandomNoise(0.3, seed=4),
    ):
        clone = type(attack).from_config(attack.get_config())
        assert clone.get_config() == attack.get_config()
        assert make_attack(attack.name, **attack.get_config()).get_config() == attack.get_config()


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: PGD(0.1, norm="l3"), "norm"),
        (lambda: PGD(-0.1), "epsilon"),
        (lambda: PGD(0.1, steps=0), "steps"),
        (lambda: PGD(0.1, clip_min=0.0), "clip_max"),
        (lambda: PGD(0.1, clip_min=1.0, clip_max=0.0), "clip_min"),
        (lambda: Square(0.1, p_init=0.0), "p_init"),
        (lambda: make_attack("cw", epsilon=0.1), "attack"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(make, argument):
    with pytest.raises(ArgumentError, match=f"`{argument}`.*Fix:"):
        make()


def test_bad_labels_and_outputs_are_refused(trained_mlp, digits_split):
    _, (x, y) = digits_split
    with pytest.raises(ArgumentError, match="`y`"):
        pgd(trained_mlp, x[:5], np.array([0, 1, 2, 3, 42]), 0.1)
    with pytest.raises(ArgumentError, match="`y`"):
        pgd(trained_mlp, x[:5], y[:4], 0.1)
    two_outputs = keras.Model(trained_mlp.inputs, [trained_mlp.outputs[0], trained_mlp.outputs[0]])
    with pytest.raises(ArgumentError, match="`model`"):
        pgd(two_outputs, x[:5], y[:5], 0.1)
