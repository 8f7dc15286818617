"""Adversarial training stages: per-example independence, DP reference, robustness gained."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import ArgumentError
from keras_safe.optimizers import DPSGD, GradientClip
from keras_safe.security import (
    PGD,
    accuracy_under_attack,
    get_evasion_attack,
    make_robust,
    register_evasion_attack,
    unregister_evasion_attack,
)
from keras_safe.security.adversarial_training import TRADES, AdversarialExamples
from keras_safe.training import get_stages, set_stages
from tests.security.conftest import make_mlp
from tests.testing import assert_config_round_trip, assert_saves_in_fresh_process

RANGE = {"clip_min": 0.0, "clip_max": 1.0}
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _ce(y, z):
    return keras.losses.sparse_categorical_crossentropy(np.asarray(y), z, from_logits=True)


def _kl(p_logits, q_logits):
    log_p = tf.nn.log_softmax(p_logits)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(q_logits)), axis=-1)


def _ascent_alone(objective, x0, epsilon, step, steps, start):
    """Sign-gradient ascent of `objective` for one example, projected onto ball and [0, 1]."""
    xa = tf.clip_by_value(tf.clip_by_value(start, x0 - epsilon, x0 + epsilon), 0.0, 1.0)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(xa)
            value = objective(xa)
        xa = xa + step * tf.sign(tape.gradient(value, xa))
        xa = tf.clip_by_value(tf.clip_by_value(xa, x0 - epsilon, x0 + epsilon), 0.0, 1.0)
    return xa


def _pgd_alone(model, xi, yi, epsilon, steps):
    x0 = tf.constant(xi[None])
    return _ascent_alone(
        lambda xa: _ce([yi], model(xa)), x0, epsilon, 2.5 * epsilon / steps, steps, x0
    )


def _trades_offset(shape):
    # TRADES(random_start=False) starts from x + 0.001 * this fixed draw (see its docstring).
    return 0.001 * tf.random.stateless_normal([1, *shape], [0, 0])


def _trades_loss_alone(model, xi, yi, epsilon, steps, beta):
    x0 = tf.constant(xi[None])
    clean = tf.stop_gradient(model(x0))
    start = x0 + _trades_offset(xi.shape)
    xa = _ascent_alone(
        lambda xa: _kl(clean, model(xa)), x0, epsilon, 2.5 * epsilon / steps, steps, start
    )
    z = model(x0)
    return _ce([yi], z)[0] + beta * _kl(z, model(xa))[0]


@pytest.fixture()
def batch(digits_split):
    (x, y), _ = digits_split
    return x[:12], y[:12]


@pytest.mark.parametrize("norm, epsilon", [("linf", 0.1), ("l2", 0.7)])
def test_adversarial_examples_stay_in_the_ball_and_the_range(trained_mlp, batch, norm, epsilon):
    x, y = batch
    for random_start in (True, False):
        stage = AdversarialExamples(
            PGD(epsilon, steps=4, norm=norm, random_start=random_start, **RANGE)
        )
        x_adv, y_out, w_out = stage.transform(trained_mlp, x, y, None)
        d = (np.asarray(x_adv, np.float64) - x).reshape(len(x), -1)
        norms = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
        assert norms.max() <= epsilon * (1 + 1e-5) and np.median(norms) > 0.5 * epsilon
        assert np.asarray(x_adv).min() >= 0 and np.asarray(x_adv).max() <= 1
        assert y_out is y and w_out is None
        assert np.mean(np.asarray(trained_mlp(x_adv)).argmax(1) == y) < np.mean(
            np.asarray(trained_mlp(x)).argmax(1) == y
        )


def test_adversarial_examples_match_pgd_one_example_at_a_time(trained_mlp, batch):
    x, y = batch
    stage = AdversarialExamples(PGD(0.1, steps=5, random_start=False, **RANGE))
    got = np.asarray(stage.transform(trained_mlp, x, y, None)[0])
    want = np.concatenate([_pgd_alone(trained_mlp, xi, yi, 0.1, 5).numpy() for xi, yi in zip(x, y)])
    assert np.mean(np.abs(got - want) > 1e-5) < 0.005


def test_random_starts_keep_examples_independent(trained_mlp, batch):
    x, y = batch
    other = x.copy()
    other[1:] = x[::-1][:-1]  # every example but the first replaced
    stage = AdversarialExamples(PGD(0.1, steps=3, **RANGE))
    outs = []
    for inputs in (x, other):
        tf.random.set_seed(5)
        outs.append(np.asarray(stage.transform(trained_mlp, inputs, y, None)[0]))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-6)
    trades = TRADES(PGD(0.1, steps=3))
    losses = []
    for inputs in (x, other):
        tf.random.set_seed(5)
        losses.append(
            np.asarray(trades.losses(trained_mlp, inputs, y, None, lambda t, p, w: _ce(t, p))[0])
        )
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)


def test_trades_losses_are_per_example_and_follow_the_formula(trained_mlp, batch):
    x, y = batch
    stage = TRADES(PGD(0.1, steps=4, random_start=False, **RANGE), beta=3.0)
    per_example = lambda t, p, w: _ce(t, p)  # noqa: E731
    losses, y_pred = stage.losses(trained_mlp, x, y, None, per_example)
    assert tuple(losses.shape) == (12,)
    np.testing.assert_allclose(np.asarray(y_pred), np.asarray(trained_mlp(x)), atol=1e-6)
    alone = [float(_trades_loss_alone(trained_mlp, xi, yi, 0.1, 4, 3.0)) for xi, yi in zip(x, y)]
    np.testing.assert_allclose(np.asarray(losses), alone, rtol=1e-4, atol=1e-6)
    # beta = 0 is the clean cross-entropy; the robustness term is a KL divergence (>= 0).
    clean_only = TRADES(PGD(0.1, steps=4, random_start=False, **RANGE), beta=0.0)
    ce = np.asarray(_ce(y, trained_mlp(x)))
    np.testing.assert_allclose(
        np.asarray(clean_only.losses(trained_mlp, x, y, None, per_example)[0]), ce, rtol=1e-6
    )
    assert np.all(np.asarray(losses) >= ce - 1e-6)
    # Sample weights scale both terms of an example.
    weights = np.linspace(0.0, 2.0, 12).astype("float32")
    weighted = stage.losses(trained_mlp, x, y, weights, lambda t, p, w: _ce(t, p) * w)[0]
    np.testing.assert_allclose(
        np.asarray(weighted), np.asarray(losses) * weights, rtol=1e-4, atol=1e-6
    )


def _dp_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(DPSGD(1.0, l2_norm_clip=0.3, noise_multiplier=0.0), CE)
    return model


@pytest.mark.parametrize("method, private_first", [("pgd", True), ("pgd", False), ("trades", True)])
def test_dp_with_adversarial_training_matches_the_one_example_at_a_time_reference(
    batch, method, private_first
):
    x, y = batch
    model = _dp_model(3)
    settings = dict(epsilon=0.1, method=method, steps=3, random_start=False, beta=2.0, **RANGE)
    if private_first:
        keras_safe.privacy.make_private(model)
        make_robust(model, **settings)
    else:
        make_robust(model, **settings)
        keras_safe.privacy.make_private(model)
    variables = model.trainable_variables
    before = [v.numpy().astype(np.float64) for v in variables]
    # Reference: each example's adversarial loss alone, its gradient clipped to C, summed.
    clipped_sum = [np.zeros_like(b) for b in before]
    for xi, yi in zip(x, y):
        with tf.GradientTape() as tape:
            if method == "pgd":
                loss = _ce([yi], model(_pgd_alone(model, xi, yi, 0.1, 3)))[0]
            else:
                loss = _trades_loss_alone(model, xi, yi, 0.1, 3, 2.0)
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        for total, g in zip(clipped_sum, grads):
            total += g * min(1.0, 0.3 / norm)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for b, v, s in zip(before, variables, clipped_sum):
        # SGD with learning rate 1, no noise: the step is minus the clipped sum over B.
        np.testing.assert_allclose(v.numpy() - b, -s / len(x), rtol=2e-3, atol=2e-6)


def test_adversarial_training_raises_accuracy_under_pgd(digits_split):
    (x, y), (xt, yt) = digits_split
    attack = PGD(0.1, steps=20, seed=0, **RANGE)
    results = {}
    for method in ("plain", "pgd", "trades"):
        keras.utils.set_random_seed(0)
        model = make_mlp()
        if method != "plain":
            make_robust(model, 0.1, method=method, steps=4, **RANGE)
        model.fit(x, y, epochs=8, batch_size=64, verbose=0)
        results[method] = accuracy_under_attack(model, xt, yt, attack)
    plain = results["plain"]["adversarial_accuracy"]
    assert results["pgd"]["adversarial_accuracy"] >= plain + 0.15, results
    assert results["trades"]["adversarial_accuracy"] >= plain + 0.15, results
    assert min(r["clean_accuracy"] for r in results.values()) > 0.85


def test_composes_with_gradient_clip_and_saves_with_the_model(batch, tmp_path):
    x, y = batch
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(GradientClip(keras.optimizers.SGD(0.5), clip_norm=0.01), CE)
    make_robust(model, 0.1, method="trades", steps=2, beta=1.5, **RANGE)
    before = model.layers[0].kernel.numpy()
    model.fit(x, y, batch_size=12, epochs=1, verbose=0)
    step = np.linalg.norm(np.concatenate([(model.layers[0].kernel.numpy() - before).ravel()]))
    assert 0 < step <= 0.5 * 0.01 * (1 + 1e-4) + 1e-6  # learning rate times the clip norm, at most
    path = tmp_path / "robust.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (stage,) = get_stages(loaded)
    assert isinstance(stage, TRADES) and stage.get_config() == get_stages(model)[0].get_config()
    loaded.fit(x, y, batch_size=12, epochs=1, verbose=0)
    assert_saves_in_fresh_process([(model, x)])


def test_make_robust_replaces_its_stage_and_checks_arguments(batch):
    model = make_mlp()
    make_robust(model, 0.1, steps=2)
    make_robust(model, 0.2, method="trades", steps=2)
    (stage,) = get_stages(model)
    assert isinstance(stage, TRADES) and stage.epsilon == 0.2
    with pytest.raises(ArgumentError, match="`method`.*Fix:"):
        make_robust(model, 0.1, method="fgsm")
    with pytest.raises(ArgumentError, match="`epsilon`"):
        make_robust(model, -0.1)
    with pytest.raises(ArgumentError, match="`norm`"):
        make_robust(model, 0.1, norm="l1")
    with pytest.raises(ArgumentError, match="`beta`"):
        TRADES(PGD(0.1), beta=-1.0)
    with pytest.raises(ArgumentError, match="`objective`.*Fix:"):
        make_robust(model, 0.1, objective="madry")
    with pytest.raises(ArgumentError, match="`attack` must be the name of an evasion attack"):
        make_robust(model, 0.1, attack="cw")
    with pytest.raises(ArgumentError, match="`method` must be left out"):
        make_robust(model, 0.1, method="pgd", objective="trades")
    with pytest.raises(ArgumentError, match="`targeted`"):
        make_robust(model, attack=PGD(0.1, targeted=True))
    with pytest.raises(ArgumentError, match="`epsilon` must be left out"):
        make_robust(model, 0.1, attack=PGD(0.1))
    with pytest.raises(ArgumentError, match="`stages`"):
        set_stages(model, [TRADES(PGD(0.1)), TRADES(PGD(0.2))])


def test_stage_config_round_trip():
    for stage in (
        AdversarialExamples(PGD(0.1, steps=3, norm="l2", clip_min=0.0, clip_max=1.0)),
        TRADES(PGD(0.05, step_size=0.01, random_start=False, from_logits=True), beta=2.0),
    ):
        assert_config_round_trip(stage)


def test_stages_saved_by_keras_safe_0_2_0_load():
    """0.2.0 saved the PGD settings flat in the stage's config."""
    flat = dict(epsilon=0.1, steps=3, step_size=None, norm="l2", clip_min=0.0, clip_max=1.0)
    flat.update(random_start=False, from_logits=True)
    stage = AdversarialExamples.from_config(flat)
    want = PGD(0.1, steps=3, norm="l2", clip_min=0.0, clip_max=1.0, random_start=False)
    assert type(stage.attack) is PGD
    assert stage.attack.get_config() == {**want.get_config(), "from_logits": True}
    trades = TRADES.from_config({**flat, "beta": 2.5})
    assert trades.beta == 2.5 and trades.attack.get_config() == stage.attack.get_config()


def test_the_training_examples_are_the_registered_attacks_own(trained_mlp, batch):
    """make_robust runs the attack's own search (no second PGD): with the same settings and no
    random start, its examples are the ones PGD.generate gives (the compiled loss is PGD's
    cross-entropy here)."""
    x, y = batch
    for steps in (1, 4):
        attack = PGD(0.1, steps=steps, random_start=False, **RANGE)
        got = np.asarray(AdversarialExamples(attack).transform(trained_mlp, x, y, None)[0])
        np.testing.assert_allclose(got, attack.generate(trained_mlp, x, y), atol=1e-6)


def test_any_registered_attack_trains_and_trades_keeps_no_state(batch):
    x, y = batch

    @register_evasion_attack
    class HalfFGSM(get_evasion_attack("fgsm")):
        """FGSM at half the budget: a user's attack."""

        name = "half_fgsm"

        def __init__(self, epsilon, **kwargs):
            super().__init__(epsilon / 2, **kwargs)

    try:
        for attack, objective in (
            ("fgsm", "adversarial"),
            ("apgd", "trades"),
            ("half_fgsm", "trades"),
        ):
            model = make_mlp()
            make_robust(model, 0.1, attack=attack, objective=objective, steps=2, **RANGE)
            (stage,) = get_stages(model)
            assert stage.attack.name == attack
            before = dict(vars(stage))
            model.fit(x, y, batch_size=6, epochs=1, verbose=0)
            assert vars(stage) == before  # nothing carried from one hook to the next
        assert stage.epsilon == 0.05  # the user's attack, with its own rule
    finally:
        unregister_evasion_attack("half_fgsm")
