"""The privacy ledger: its figures against dp-accounting, its budget, its statement, old files."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import ArgumentError
from keras_safe.accounting import privacy_statement
from keras_safe.privacy import PrivacyLedger
from tests import dp_reference


def _charged(segments, capacity=32):
    """A ledger charged eagerly with `(noise, rate, n, steps)` segments."""
    ledger = PrivacyLedger(capacity=capacity)
    for noise, rate, n, steps in segments:
        slot = ledger.slot(noise, rate, n)
        for _ in range(steps):
            ledger.charge(slot)
    return ledger


def test_epsilon_composes_the_segments_as_dp_accounting_does():
    ledger = _charged([(1.1, 0.05, 1000, 30), (0.9, 0.1, 1000, 10), (1.1, 0.05, 1000, 5)])
    assert ledger.steps == 45 and len(ledger.segments()) == 2
    for accountant in ("rdp", "pld"):
        expected = dp_reference.dp_sgd_epsilon([(1.1, 0.05, 35), (0.9, 0.1, 10)], 1e-4, accountant)
        assert ledger.epsilon(1e-4, accountant) == pytest.approx(expected, rel=1e-9)
    # Without a delta: the default rule on the smallest training set, 1 / n**1.1.
    assert ledger.delta() == pytest.approx(1000**-1.1)


def test_a_delta_of_one_over_n_or_more_is_refused_by_the_ledger():
    ledger = _charged([(1.1, 0.05, 1000, 3)])
    for call in (lambda: ledger.epsilon(1e-3), lambda: ledger.set_budget(2.0, delta=0.5)):
        with pytest.raises(ArgumentError, match=r"`delta` must be below 1/num_examples = 0\.001"):
            call()


def test_a_statement_from_the_ledger_quotes_its_steps_and_epsilon():
    ledger = _charged([(1.1, 0.05, 1000, 30), (2.0, 1.0, 1000, 4)])
    ledger.set_budget(6.0, 1e-4)
    text = privacy_statement(ledger=ledger)
    expected = dp_reference.dp_sgd_epsilon([(1.1, 0.05, 30), (2.0, 1.0, 4)], 1e-4)
    assert f"epsilon spent after 34 steps: {expected:.4f}" in text
    assert f"{ledger.epsilon():.4f}" in text and "34 noisy steps" in text
    assert "30 steps over 1000 examples, Poisson sampling at rate 0.05" in text
    assert "target_epsilon 6 at delta 0.0001, RDP accountant" in " ".join(text.split())
    assert ledger.statement() == text
    with pytest.raises(ArgumentError, match="epochs"):
        privacy_statement(epochs=3, ledger=ledger)


def test_one_budget_explicitly_changed():
    ledger = _charged([(1.1, 0.05, 1000, 3)])
    ledger.require_budget(3.0, 1e-4, source="the test")
    assert ledger.budget() == (3.0, 1e-4) and ledger.accountant == "rdp"
    ledger.require_budget(3.0)  # the same budget again
    with pytest.raises(ArgumentError, match=r"target_epsilon.*one budget.*set_budget"):
        ledger.require_budget(4.0, source="the test")
    with pytest.raises(ArgumentError, match="delta"):
        ledger.require_budget(3.0, delta=1e-5)
    with pytest.raises(ArgumentError, match="accountant"):
        ledger.require_budget(3.0, accountant="pld")
    ledger.set_budget(4.0)  # the explicit raise keeps delta and accountant
    assert ledger.budget() == (4.0, 1e-4) and ledger.accountant == "rdp"


def test_the_gate_allows_exactly_the_steps_the_budget_allows():
    noise, rate, n, target, delta = 1.1, 0.05, 1000, 1.0, 1e-5
    allowed = 0
    while dp_reference.epsilon(noise, rate, allowed + 1, delta) <= target:
        allowed += 1
    ledger = PrivacyLedger()
    ledger.set_budget(target, delta)
    slot = ledger.slot(noise, rate, n)
    assert ledger.steps_left(slot) == allowed

    @tf.function
    def step():
        return ledger.charge(slot).allowed

    assert all(bool(step()) for _ in range(allowed))
    with pytest.raises(tf.errors.InvalidArgumentError, match="privacy budget"):
        step()
    assert ledger.steps == allowed and ledger.epsilon() <= target
    # Another segment gets what is left once it is used (the first one is closed meanwhile).
    more = 0
    while dp_reference.dp_sgd_epsilon([(noise, rate, allowed), (3.0, rate, more + 1)], delta) <= (
        target
    ):
        more += 1
    other = ledger.slot(3.0, rate, n)
    assert ledger.steps_left(other) == more


def test_a_ledger_saved_before_the_budget_was_recorded_loads_with_every_step():
    # Nine variables: noise, rate, examples, seeded, steps, rows, used, non-finite, budget.
    old = {
        "0": np.r_[1.1, np.zeros(31)],
        "1": np.r_[0.05, np.zeros(31)],
        "2": np.r_[1000, np.zeros(31, "int64")],
        "3": np.zeros(32, "int64"),
        "4": np.r_[12, np.zeros(31, "int64")],
        "5": np.r_[600, np.zeros(31, "int64")],
        "6": np.array(1),
        "7": np.array(0),
        "8": np.array([0.0, 0.0]),
    }

    class Store(dict):
        def keys(self):
            return list(super().keys())

    ledger = PrivacyLedger()
    ledger.load_own_variables(Store(old))
    assert ledger.steps == 12 and ledger.segments()[0]["events"] == 12
    assert ledger.epsilon(1e-4) == pytest.approx(dp_reference.epsilon(1.1, 0.05, 12, 1e-4))


def test_a_ledger_saved_before_its_lineage_was_recorded_loads_with_a_lineage_of_its_own():
    saved = PrivacyLedger()
    slot = saved.slot(noise_multiplier=1.1, sampling_rate=0.05, num_examples=1000)
    for _ in range(4):
        saved.charge(slot)
    old = [np.array(v) for v in saved.weights[:-1]]  # the layout before the lineage

    class Store(dict):
        def keys(self):
            return list(super().keys())

    ledger = PrivacyLedger()
    drawn = ledger.lineage
    ledger.load_own_variables(Store({str(i): v for i, v in enumerate(old)}))
    assert ledger.segments() == saved.segments() and ledger.lineage == drawn != saved.lineage
    full = PrivacyLedger()
    full.load_own_variables(Store({str(i): np.array(v) for i, v in enumerate(saved.weights)}))
    assert full.lineage == saved.lineage and full.steps == 4


def test_the_ledger_round_trips_its_config():
    ledger = PrivacyLedger(capacity=8)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ledger))
    assert clone.capacity == 8 and clone.steps == 0
