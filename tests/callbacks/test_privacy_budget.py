"""Tests of keras_safe.callbacks.PrivacyBudget."""

import csv
import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.accounting import compute_epsilon
from keras_safe.callbacks import PrivacyBudget
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import get_ledger, make_private
from tests import dp_reference
from tests.testing import assert_config_round_trip

N, BATCH, DELTA, NOISE = 96, 16, 1e-3, 1.1
STEPS_PER_EPOCH = N // BATCH  # 6


def _data(n=N):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return x, y


def _model(private=True, steps_per_execution=1, **dp_kwargs):
    settings = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE, batch_size=BATCH)
    settings.update(dp_kwargs)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=DPSGD(**settings),
        loss="sparse_categorical_crossentropy",
        steps_per_execution=steps_per_execution,
    )
    # make_private before fit: fit on arrays then samples Poisson batches.
    return make_private(model) if private else model


def _reference_epsilon(steps, sampling_rate=BATCH / N, noise=NOISE, delta=DELTA):
    return compute_epsilon(
        steps=steps, sampling_rate=sampling_rate, noise_multiplier=noise, delta=delta
    )


def test_writes_epsilon_into_history_and_csv():
    x, y = _data()
    model = _model()
    budget = PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)
    csv_path = os.path.join(tempfile.mkdtemp(), "log.csv")
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        verbose=0,
        callbacks=[budget, keras.callbacks.CSVLogger(csv_path)],
    )
    expected = [_reference_epsilon(STEPS_PER_EPOCH * (e + 1)) for e in range(3)]
    np.testing.assert_allclose(history.history["epsilon"], expected, rtol=1e-12)
    assert history.history["delta"] == [DELTA] * 3
    assert history.history["poisson_sampled"] == [1.0] * 3
    assert budget.steps == 3 * STEPS_PER_EPOCH
    assert budget.epsilon == pytest.approx(expected[-1], rel=1e-12)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["epsilon"]) for r in rows], expected, rtol=1e-6)


def test_stops_before_exceeding_target(capsys):
    target = 3.3
    # Independent search for the largest number of steps whose epsilon stays within target.
    allowed = 0
    while _reference_epsilon(allowed + 1) <= target:
        allowed += 1
    assert allowed % STEPS_PER_EPOCH != 0  # the stop falls inside an epoch

    x, y = _data()
    model = _model()
    budget = PrivacyBudget(num_examples=N, delta=DELTA, target_epsilon=target)
    history = model.fit(x, y, batch_size=BATCH, epochs=50, verbose=0, callbacks=[budget])
    assert int(model.optimizer.iterations) == allowed
    assert len(history.history["epsilon"]) == allowed // STEPS_PER_EPOCH + 1
    assert history.history["epsilon"][-1] <= target
    assert history.history["epsilon"][-1] == pytest.approx(_reference_epsilon(allowed))
    assert "stopping training" in capsys.readouterr().out

    # A further fit cannot take a single step past the budget.
    with pytest.raises(RuntimeError, match="already spent"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[budget])
    assert int(model.optimizer.iterations) == allowed


def test_keeps_counting_across_fit_calls():
    x, y = _data()
    model = _model()
    first = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0,
        callbacks=[PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)],
    )  # fmt: skip
    second = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0,
        callbacks=[PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)],
    )  # fmt: skip
    assert first.history["epsilon"][0] == pytest.approx(_reference_epsilon(STEPS_PER_EPOCH))
    assert second.history["epsilon"][0] == pytest.approx(_reference_epsilon(2 * STEPS_PER_EPOCH))


# A PrivacyBudget fit that resumes counting after save and load in a fresh process is checked
# in tests/training/test_budget.py, in the one fresh process that reloads every model class.


def test_reads_num_examples_from_fit_and_defaults_delta(capsys):
    n = 90
    x, y = _data(n)
    # Nothing declared: fit on arrays tells the number of examples and the batch size
    # (90 examples in batches of 16: an epoch is ceil(90 / 16) = 6 Poisson steps).
    model = _model(batch_size=None)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[PrivacyBudget()])
    delta = 1.0 / n**1.1
    assert history.history["delta"][0] == pytest.approx(delta, rel=1e-12)
    assert history.history["epsilon"][0] == pytest.approx(
        _reference_epsilon(6, sampling_rate=BATCH / n, delta=delta)
    )
    assert "1/n^1.1" in capsys.readouterr().out

    # A num_examples that disagrees with the data is refused (it would misstate epsilon).
    model = _model()
    with pytest.raises(ValueError, match="num_examples"):
        model.fit(
            x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[PrivacyBudget(num_examples=900)]
        )
    assert int(model.optimizer.iterations) == 0

    # The optimizer's delta is used when the callback has none.
    model = _model(delta=1e-4)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[PrivacyBudget(verbose=0)]
    )
    assert history.history["epsilon"][0] == pytest.approx(
        _reference_epsilon(6, sampling_rate=BATCH / n, delta=1e-4)
    )

    # A generic tf.data pipeline does not tell its size: num_examples is needed, here or on
    # the optimizer, and then the declared batch size. keras_safe cannot see its batches
    # drawn: each step is a Gaussian mechanism of its own unless the optimizer declares them
    # Poisson samples.
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model = _model()
    with pytest.raises(PrivacyError, match="num_examples"):
        model.fit(data, epochs=1, verbose=0, callbacks=[PrivacyBudget()])
    history = model.fit(
        data, epochs=1, verbose=0, callbacks=[PrivacyBudget(num_examples=n, delta=1e-4)]
    )
    assert history.history["epsilon"][0] == pytest.approx(dp_reference.epsilon(NOISE, 1.0, 6, 1e-4))
    model = _model(sampling="poisson")
    history = model.fit(
        data, epochs=1, verbose=0, callbacks=[PrivacyBudget(num_examples=n, delta=1e-4)]
    )
    assert history.history["epsilon"][0] == pytest.approx(
        dp_reference.epsilon(NOISE, BATCH / n, 6, 1e-4)
    )


def test_gradient_accumulation_and_microbatches():
    x, y = _data()
    model = _model(gradient_accumulation_steps=2)
    budget = PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[budget])
    # 6 batches make 3 noisy updates of 2 x 16 examples each. Each batch is sampled on its
    # own and adds 1/sqrt(2) of the noise: 6 accounted steps at noise / sqrt(2).
    assert int(model.optimizer.iterations) == 3
    assert budget.steps == 6
    assert history.history["epsilon"][0] == pytest.approx(
        _reference_epsilon(6, sampling_rate=BATCH / N, noise=NOISE / np.sqrt(2))
    )

    # Microbatches of 4 examples: one example can move a clipped microbatch mean by twice
    # the clipping norm, so the noise counts half (TF Privacy's rule).
    # Poisson batches are padded to a multiple of the microbatches; an example's microbatch
    # is its row's, so the analysis holds under zero-out adjacency.
    model = _model(num_microbatches=4)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0,
        callbacks=[PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)],
    )  # fmt: skip
    assert history.history["epsilon"][0] == pytest.approx(
        _reference_epsilon(STEPS_PER_EPOCH, noise=NOISE / 2)
    )


def test_pld_accountant():
    x, y = _data()
    model = _model()
    budget = PrivacyBudget(num_examples=N, delta=DELTA, accountant="pld", verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[budget])
    pld = compute_epsilon(
        steps=STEPS_PER_EPOCH, sampling_rate=BATCH / N, noise_multiplier=NOISE, delta=DELTA,
        accountant="pld",
    )  # fmt: skip
    assert history.history["epsilon"][0] == pytest.approx(pld)
    assert pld <= _reference_epsilon(STEPS_PER_EPOCH)


def test_needs_a_dp_optimizer():
    x, y = _data()
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    plain.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    before = [np.array(v) for v in plain.trainable_variables]
    with pytest.raises(PrivacyError, match="DP optimizer"):
        plain.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[PrivacyBudget(num_examples=N)])
    for b, v in zip(before, plain.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))


def test_a_model_made_private_inside_a_fit_on_arrays_is_refused_without_the_opt_in():
    # The callback alone comes too late for Poisson sampling: Keras has already cut the arrays
    # into shuffled fixed-size batches, for which the Poisson figure is not a proof.
    x, y = _data()
    model = _model(private=False)
    with pytest.raises(PrivacyError, match=r"make_private\(model\) before fit"):
        model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[PrivacyBudget(verbose=0)])
    assert int(model.optimizer.iterations) == 0 and get_ledger(model).steps == 0


@pytest.mark.parametrize("opt_in", ["optimizer", "fit"])
def test_fixed_size_batches_are_an_opt_in_accounted_without_amplification(opt_in, capsys):
    # sampling="shuffle" on the optimizer (the callback alone may then make the model private
    # inside fit), or shuffle=False given to fit: Keras's fixed-size batches. Each epoch is one
    # pass over the data: one Gaussian mechanism at rate 1 per epoch, labelled in the logs and
    # the summary.
    x, y = _data()
    if opt_in == "optimizer":
        model, options = _model(private=False, sampling="shuffle"), {}
    else:
        model, options = _model(), {"shuffle": False}
    budget = PrivacyBudget(num_examples=N, delta=DELTA)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[budget], **options)
    expected = [dp_reference.dp_sgd_epsilon([(NOISE, 1.0, e + 1)], DELTA) for e in range(3)]
    np.testing.assert_allclose(history.history["epsilon"], expected, rtol=1e-12)
    assert history.history["poisson_sampled"] == [0.0] * 3
    assert budget.steps == 3 * STEPS_PER_EPOCH
    assert "fixed-size batches, no amplification" in capsys.readouterr().out
    # The Poisson figure for the same steps would be far smaller: a silent mislabel matters.
    assert expected[-1] > 1.5 * _reference_epsilon(3 * STEPS_PER_EPOCH)


def test_two_different_budgets_for_one_model_are_refused_before_any_step():
    x, y = _data()
    model = _model(noise_multiplier=None, target_epsilon=3.0, delta=DELTA)
    with pytest.raises(ValueError, match=r"target_epsilon.*one budget.*set_budget"):
        model.fit(
            x, y, batch_size=BATCH, verbose=0,
            callbacks=[PrivacyBudget(target_epsilon=2.0, verbose=0)],
        )  # fmt: skip
    assert int(model.optimizer.iterations) == 0 and get_ledger(model).steps == 0
    # The same budget twice is one budget.
    model.fit(
        x, y, batch_size=BATCH, verbose=0, callbacks=[PrivacyBudget(target_epsilon=3.0, verbose=0)]
    )
    assert get_ledger(model).budget() == (3.0, DELTA)
    assert get_ledger(model).epsilon() <= 3.0


def test_the_budget_holds_whatever_steps_per_execution():
    # The case: target 2.2 with steps_per_execution=10 ended at 3.44 (the guard stopped
    # only between executions). The gate is in the step now: fit stops at the exact step.
    target = 2.2
    allowed = 0
    while _reference_epsilon(allowed + 1) <= target:
        allowed += 1
    assert allowed % 10 != 0  # the stop falls inside an execution
    x, y = _data()
    model = _model(steps_per_execution=10)
    budget = PrivacyBudget(num_examples=N, delta=DELTA, target_epsilon=target, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=50, verbose=0, callbacks=[budget])
    assert isinstance(history, keras.callbacks.History)
    assert get_ledger(model).steps == int(model.optimizer.iterations) == allowed
    assert history.history["epsilon"][-1] == pytest.approx(_reference_epsilon(allowed))
    assert history.history["epsilon"][-1] <= target


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_examples": 0}, "num_examples"),
        ({"delta": 1.0}, "delta"),
        ({"num_examples": 100, "delta": 0.01}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"accountant": "moments"}, "accountant"),
        ({"verbose": 3}, "verbose"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PrivacyBudget(**kwargs)


def test_config_round_trip():
    budget = PrivacyBudget(
        num_examples=1000, delta=1e-5, target_epsilon=3.0, accountant="pld", verbose=0
    )
    clone = assert_config_round_trip(budget)
    assert clone.target_epsilon == 3.0 and clone.accountant == "pld"
    assert_config_round_trip(PrivacyBudget())
