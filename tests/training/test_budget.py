"""One budget, one epsilon: attacks on the model's lifetime budget through the public API.

Each test trains a tiny model, then compares what keras_safe reports with dp-accounting called
directly (`tests.dp_reference`, which imports nothing of keras_safe) on the steps that really ran,
and checks that the budget was never exceeded: across fits, recompiles, `steps_per_execution`,
`train_on_batch`, custom loops, XLA, and `.keras` files of every model class loaded in a fresh
process.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.callbacks import PrivacyBudget
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private
from tests import dp_reference
from tests.testing import REPO_ROOT

N, B, DELTA = 120, 20, 1e-3
Q = B / N
RNG = np.random.default_rng(7)


def _data(n=N):
    x = RNG.normal(size=(n, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def _model(steps_per_execution=1, jit_compile=False, **dp):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    settings = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1)
    settings.update(dp)
    model.compile(
        optimizer=DPSGD(**settings),
        loss="sparse_categorical_crossentropy",
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    return make_private(model)


def _weights(model):
    return [np.array(v) for v in model.trainable_variables]


def _unchanged(before, model):
    return all(np.array_equal(b, np.array(v)) for b, v in zip(before, model.trainable_variables))


def _ledger_reference(model, delta=DELTA, accountant="rdp"):
    """dp-accounting on the ledger's segments (accounted noise, rate, mechanisms)."""
    segments = [
        (s["noise_multiplier"], s["sampling_rate"], s["events"])
        for s in get_ledger(model).segments()
    ]
    return dp_reference.dp_sgd_epsilon(segments, delta, accountant)


def _allowed(noise, rate, target, delta=DELTA, prior=(), accountant="rdp"):
    """The most steps within `target`, searched with dp-accounting directly."""
    steps = 0
    while dp_reference.dp_sgd_epsilon([*prior, (noise, rate, steps + 1)], delta, accountant) <= (
        target
    ):
        steps += 1
    return steps


# -- item 1: every target_epsilon is the model's lifetime budget ------------------------------


def test_the_optimizers_target_epsilon_is_the_models_lifetime_budget():
    # The issue: DPSGD(target_epsilon=2) calibrated per fit, and a second fit reached 2.71.
    x, y = _data()
    model = _model(noise_multiplier=None, target_epsilon=2.0, delta=DELTA)
    model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    ledger = get_ledger(model)
    assert ledger.budget() == (2.0, DELTA) and ledger.accountant == "rdp"
    first = _ledger_reference(model)
    assert 1.99 < first <= 2.0 and ledger.epsilon() == pytest.approx(first, rel=1e-12)
    before = _weights(model)
    with pytest.raises(
        ArgumentError, match=r"target_epsilon.*spent epsilon (1\.99\d\d|2\.0000) of"
    ):
        model.fit(x, y, batch_size=B, epochs=2, verbose=0)  # refused before its first step
    assert _unchanged(before, model) and ledger.steps == 12

    # Raising the budget is explicit, and the noise is calibrated for what is left.
    ledger.set_budget(3.0)
    model.compile(
        optimizer=DPSGD(0.1, l2_norm_clip=1.0, target_epsilon=3.0, delta=DELTA),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    total = _ledger_reference(model)
    assert ledger.steps == 24 and len(ledger.segments()) == 2
    assert 2.99 < total <= 3.0 and ledger.epsilon() == pytest.approx(total, rel=1e-12)


def test_a_given_noise_whose_plan_exceeds_the_budget_is_refused_with_the_figures():
    x, y = _data()
    model = _model(noise_multiplier=0.6, target_epsilon=1.0, delta=DELTA)
    planned = dp_reference.epsilon(0.6, Q, 3 * 6, DELTA)
    with pytest.raises(ArgumentError, match=rf"noise_multiplier.*bring it to {planned:.4f}"):
        model.fit(x, y, batch_size=B, epochs=3, verbose=0)
    assert get_ledger(model).steps == 0 and int(model.optimizer.iterations) == 0


def test_the_accountant_the_user_chose_enforces_the_budget():
    # PLD allows more steps than RDP for the same budget: the stop must follow PLD.
    x, y = _data()
    target = 1.35
    rdp = _allowed(1.1, Q, target)
    pld = _allowed(1.1, Q, target, accountant="pld")
    assert pld > rdp
    model = _model()
    budget = PrivacyBudget(target_epsilon=target, delta=DELTA, accountant="pld", verbose=0)
    history = model.fit(x, y, batch_size=B, epochs=2, verbose=0, callbacks=[budget])
    ledger = get_ledger(model)
    assert ledger.accountant == "pld" and ledger.steps == pld
    assert history.history["epsilon"][-1] == pytest.approx(
        dp_reference.epsilon(1.1, Q, pld, DELTA, "pld"), rel=1e-9
    )


# -- item 2: no path takes a step past the budget -------------------------------------------


def test_train_on_batch_and_custom_loops_stop_at_the_budget_step():
    x, y = _data()
    target = 2.7
    allowed = _allowed(1.1, Q, target)
    # The caller declares its batches Poisson samples (keras_safe cannot see them drawn).
    model = _model(num_examples=N, batch_size=B, sampling="poisson")
    get_ledger(model).set_budget(target, DELTA)
    for _ in range(allowed):
        model.train_on_batch(x[:B], y[:B])
    before = _weights(model)
    with pytest.raises(PrivacyError, match="already spent"):
        model.train_on_batch(x[:B], y[:B])
    # An eager custom loop and one inside the user's tf.function: the gate is in the step.
    with pytest.raises((tf.errors.InvalidArgumentError, PrivacyError), match="privacy budget"):
        grads = keras_safe.privacy.dp_gradients(model, x[:B], y[:B])
        model.optimizer.apply(grads, model.trainable_variables)

    @tf.function
    def step(xb, yb):
        grads = keras_safe.privacy.dp_gradients(model, xb, yb)
        model.optimizer.apply(grads, model.trainable_variables)

    with pytest.raises((tf.errors.InvalidArgumentError, PrivacyError), match="privacy budget"):
        step(x[:B], y[:B])
    assert _unchanged(before, model)
    assert get_ledger(model).steps == allowed == int(model.optimizer.iterations)
    assert get_ledger(model).epsilon() == pytest.approx(_ledger_reference(model))
    assert _ledger_reference(model) <= target


def test_under_xla_a_refused_step_releases_nothing():
    # XLA drops TensorFlow assertions: the ledger's gate withholds the release instead, and fit
    # stops at the budget all the same.
    x, y = _data()
    target = 2.7
    allowed = _allowed(1.1, Q, target)
    assert allowed % 4  # the budget ends inside an execution of 4 steps
    model = _model(steps_per_execution=4, jit_compile=True)
    assert model.jit_compile
    budget = PrivacyBudget(target_epsilon=target, delta=DELTA, verbose=0)
    model.fit(x, y, batch_size=B, epochs=20, verbose=0, callbacks=[budget])
    ledger = get_ledger(model)
    # The rest of that execution is withheld (zero updates); fit stops after it.
    assert ledger.steps == allowed and 1 <= ledger.refused_steps < 4
    assert int(model.optimizer.iterations) == allowed + ledger.refused_steps
    assert ledger.epsilon() == pytest.approx(_ledger_reference(model))
    assert _ledger_reference(model) <= target
    before = _weights(model)
    with pytest.raises(PrivacyError, match="already spent"):
        model.train_on_batch(x[:B], y[:B])
    assert _unchanged(before, model)
    # Past keras_safe's own check (Keras's train_on_batch called directly): the compiled step
    # itself withholds the release, so the weights do not move.
    refused = ledger.refused_steps
    keras.Model.train_on_batch(model, x[:B], y[:B])
    assert _unchanged(before, model) and ledger.refused_steps == refused + 1
    assert ledger.steps == allowed


# -- item 3: every model class restores its ledger, in a fresh process -----------------------


@keras.saving.register_keras_serializable(package="tests_budget")
class SubclassedNet(keras.Model):
    def __init__(self, units=2, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(3, activation="relu")
        self.out = keras.layers.Dense(units)

    def call(self, inputs):
        return self.out(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="tests_budget")
class SequentialSubclass(keras.Sequential):
    pass


def _all_classes():
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    subclassed = SubclassedNet()
    subclassed(np.zeros((1, 4), "float32"))
    return {
        "sequential": keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
        "functional": functional,
        "subclassed": subclassed,
        "sequential_subclass": SequentialSubclass([keras.Input((4,)), keras.layers.Dense(2)]),
    }


_RELOAD = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import keras_safe
    from tests.training.test_budget import _all_classes

    folder, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    out = {}
    for name in json.loads(sys.argv[4]):
        row = {}
        for compile in (False, True):
            model = keras.saving.load_model(f"{folder}/{name}.keras", compile=compile)
            ledger = keras_safe.privacy.get_ledger(model)
            row[f"compile={compile}"] = {
                "class": type(model).__name__,
                "private": keras_safe.training.is_private(model),
                "budget": ledger.budget(),
                "accountant": ledger.accountant,
                "segments": ledger.segments(),
            }
        row["statement"] = ledger.statement()
        if name == "subclassed":
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # the compiled one continues
            row["after"] = ledger.segments()
            row["statement_after"] = ledger.statement()
            # Weights (and optimizer state) loaded into a model built from code: its ledger was
            # not restored, so make_private refuses instead of starting from zero.
            fresh = _all_classes()[name]
            optimizer = keras_safe.optimizers.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1)
            fresh.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
            fresh.optimizer.build(fresh.trainable_variables)
            fresh.load_weights(f"{folder}/{name}.keras")
            try:
                keras_safe.privacy.make_private(fresh)
                row["fresh"] = "accepted"
            except RuntimeError as error:
                row["fresh"] = str(error)
        out[name] = row
    print(json.dumps(out))
    """
)


# A PrivacyBudget fit on a model saved after 12 steps and loaded again: it counts on from them.
_RESUME = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import keras_safe
    path, n, batch, delta, target = sys.argv[1:6]
    model = keras.saving.load_model(path)
    restored = int(model.optimizer.iterations)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(int(n), 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    budget = keras_safe.callbacks.PrivacyBudget(
        num_examples=int(n), delta=float(delta), target_epsilon=float(target), verbose=0)
    history = model.fit(x, y, batch_size=int(batch), epochs=20, verbose=0, callbacks=[budget])
    print(json.dumps({"restored": restored, "epsilon": history.history["epsilon"],
                      "iterations": int(model.optimizer.iterations)}))
    """
)

# Runs each (script, arguments) of argv[1] in turn in this one process (TensorFlow starts once)
# and prints the last line each printed, as a JSON list.
_RUN_SCRIPTS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    printed = []
    for script, arguments in json.loads(sys.argv[1]):
        sys.argv = ["-c", *arguments]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            exec(compile(script, "<script>", "exec"), {"__name__": "__main__"})
        printed.append(out.getvalue().strip().splitlines()[-1])
    print(json.dumps(printed))
    """
)


def test_every_model_class_restores_its_ledger_and_budget_in_a_fresh_process(tmp_path):
    # Also: a PrivacyBudget fit on a reloaded model resumes counting (one fresh process for both).
    x, y = _data()
    models = _all_classes()
    expected = {}
    for name, model in models.items():
        model.compile(
            optimizer=DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.1),
            loss="sparse_categorical_crossentropy",
        )
        make_private(model)
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)
        get_ledger(model).set_budget(8.0, DELTA, "pld" if name == "functional" else "rdp")
        model.save(str(tmp_path / f"{name}.keras"))
        expected[name] = get_ledger(model).segments()
    # The PrivacyBudget case: 2 epochs of 6 steps, then as many steps as a target of 3.3 allows.
    resumed = _model(batch_size=B)
    x_resume, y_resume = _data()
    resumed.fit(
        x_resume, y_resume, batch_size=B, epochs=2, verbose=0,
        callbacks=[PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)],
    )  # fmt: skip
    resumed.save(str(tmp_path / "resumed.keras"))
    target = 3.3
    allowed = _allowed(1.1, Q, target)

    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    scripts = [
        (_RELOAD, [str(tmp_path), str(N), str(B), json.dumps(list(models))]),
        (_RESUME, [str(tmp_path / "resumed.keras"), str(N), str(B), str(DELTA), str(target)]),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _RUN_SCRIPTS, json.dumps(scripts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out, resume = (json.loads(line) for line in json.loads(result.stdout.strip().splitlines()[-1]))
    for name in models:
        accountant = "pld" if name == "functional" else "rdp"
        for compile in (False, True):
            loaded = out[name][f"compile={compile}"]
            assert loaded["private"], (name, compile)
            assert loaded["segments"] == expected[name], (name, compile)
            assert loaded["budget"] == [8.0, DELTA] and loaded["accountant"] == accountant
        segments = [
            (s["noise_multiplier"], s["sampling_rate"], s["events"]) for s in expected[name]
        ]
        reference = dp_reference.dp_sgd_epsilon(segments, DELTA, accountant)
        assert f"epsilon spent after 6 steps: {reference:.4f}" in out[name]["statement"], name
    subclassed = out["subclassed"]
    assert subclassed["compile=True"]["class"] == "SubclassedNet"
    assert [s["steps"] for s in subclassed["after"]] == [12]  # 6 restored + 6: one segment
    reference = dp_reference.epsilon(1.1, Q, 12, DELTA)
    assert f"epsilon spent after 12 steps: {reference:.4f}" in subclassed["statement_after"]
    assert "ledger saved with the model was not restored" in subclassed["fresh"]

    assert resume["restored"] == 2 * N // B
    # The resumed run starts from 12 steps, not from zero: it stops within its first epoch at
    # the same step a single uninterrupted run would (a reset would run on to 15 more steps).
    assert 2 * N // B < allowed < 3 * N // B
    assert resume["iterations"] == allowed
    assert resume["epsilon"] == [pytest.approx(dp_reference.epsilon(1.1, Q, allowed, DELTA))]


# -- item 8 (issue 24): bad input on the paths of this issue ----------------------------------


def test_fit_on_empty_arrays_names_x():
    model = _model()
    with pytest.raises(ArgumentError, match=r"`x` must be non-empty"):
        model.fit(np.zeros((0, 4), "float32"), np.zeros((0,), "int32"), verbose=0)
    x, y = _data(4)
    with pytest.raises(ArgumentError, match=r"`x`.*validation_split"):
        model.fit(x[:1], y[:1], validation_split=0.5, verbose=0)


def test_a_delta_of_one_over_n_or_more_is_refused_before_training():
    x, y = _data()
    for make in (
        lambda: _model(delta=0.01),  # the optimizer's delta, checked against fit's 120 examples
        lambda: _model(delta=0.01, num_examples=N),  # declared: refused at once
    ):
        with pytest.raises(ArgumentError, match=r"`delta` must be below 1/num_examples"):
            model = make()
            model.fit(x, y, batch_size=B, verbose=0)
    model = _model()
    with pytest.raises(ArgumentError, match=r"`delta` must be below 1/num_examples"):
        model.fit(x, y, batch_size=B, verbose=0, callbacks=[PrivacyBudget(delta=0.5)])
    assert get_ledger(model).steps == 0


def test_a_private_model_without_noise_warns_that_it_is_not_private():
    x, y = _data()
    model = _model(noise_multiplier=0.0)
    with pytest.warns(UserWarning, match="not differentially private .epsilon is infinite"):
        model.fit(x, y, batch_size=B, verbose=0)
    assert get_ledger(model).epsilon() == float("inf")


def test_a_private_fit_does_not_make_keras_warn_about_shuffle():
    x, y = _data()
    model = _model()
    data = keras_safe.privacy.poisson_batches(x, y, batch_size=B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=B, verbose=0)  # arrays: Poisson batches, a dataset
        model.fit(data, verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]
