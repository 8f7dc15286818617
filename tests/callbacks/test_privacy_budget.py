"""Tests of keras_safe.callbacks.PrivacyBudget."""

import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.callbacks import PrivacyBudget
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import compute_epsilon
from tests.testing import REPO_ROOT, assert_config_round_trip

N, BATCH, DELTA, NOISE = 96, 16, 1e-3, 1.1
STEPS_PER_EPOCH = N // BATCH  # 6


def _data(n=N):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return x, y


def _model(**dp_kwargs):
    settings = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE, batch_size=BATCH)
    settings.update(dp_kwargs)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=DPSGD(**settings), loss="sparse_categorical_crossentropy")
    return model


def _reference_epsilon(steps, sampling_rate=BATCH / N, noise=NOISE, delta=DELTA):
    return compute_epsilon(
        steps=steps, sampling_rate=sampling_rate, noise_multiplier=noise, delta=delta
    )


def test_writes_epsilon_into_history_and_csv():
    x, y = _data()
    model = _model()  # no make_private: the callback installs the DP train step
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


_RESUME_SCRIPT = textwrap.dedent(
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


def test_resumes_counting_after_save_and_load_in_fresh_process():
    x, y = _data()
    model = _model()
    model.fit(
        x, y, batch_size=BATCH, epochs=2, verbose=0,
        callbacks=[PrivacyBudget(num_examples=N, delta=DELTA, verbose=0)],
    )  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(), "dp_model.keras")
    model.save(path)
    target = 3.3
    allowed = 0
    while _reference_epsilon(allowed + 1) <= target:
        allowed += 1

    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, path, str(N), str(BATCH), str(DELTA), str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["restored"] == 2 * STEPS_PER_EPOCH
    # The resumed run starts from 12 steps, not from zero: it stops within its first epoch at
    # the same step a single uninterrupted run would (a reset would run on to 15 more steps).
    assert 2 * STEPS_PER_EPOCH < allowed < 3 * STEPS_PER_EPOCH
    assert out["iterations"] == allowed
    assert out["epsilon"] == [pytest.approx(_reference_epsilon(allowed))]


def test_reads_num_examples_from_fit_and_defaults_delta(capsys):
    n = 90
    x, y = _data(n)
    # Nothing declared: fit on arrays tells the number of examples and the batch size.
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
    # the optimizer, and then the declared batch size.
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model = _model()
    with pytest.raises(PrivacyError, match="num_examples"):
        model.fit(data, epochs=1, verbose=0, callbacks=[PrivacyBudget()])
    history = model.fit(
        data, epochs=1, verbose=0, callbacks=[PrivacyBudget(num_examples=n, delta=1e-4)]
    )
    assert history.history["epsilon"][0] == pytest.approx(
        _reference_epsilon(6, sampling_rate=BATCH / n, delta=1e-4)
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


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_examples": 0}, "num_examples"),
        ({"delta": 1.0}, "delta"),
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
