"""The attack registry: names and families, lookups, and a user's attack end to end."""

import keras
import numpy as np
import pytest
from scipy import stats

from keras_safe.audit import (
    MembershipAttack,
    get_membership_attack,
    membership_attack_families,
    membership_attack_names,
    membership_inference,
    register_membership_attack,
    unregister_membership_attack,
)
from keras_safe.audit.attacks.registry import DEFAULT_ATTACKS, resolve_attacks
from keras_safe.callbacks import MembershipInferenceAudit
from tests.audit.conftest import make_mlp


@pytest.fixture
def registry_guard():
    """Restores the registry after a test that registers attacks."""
    yield
    for name in membership_attack_names():
        if get_membership_attack(name) not in DEFAULT_ATTACKS:
            unregister_membership_attack(name)
    assert membership_attack_names() == tuple(a.name for a in DEFAULT_ATTACKS)


def test_builtin_names_order_and_families():
    assert membership_attack_names()[:7] == (
        "loss",
        "confidence",
        "entropy",
        "modified_entropy",
        "learned",
        "lira_online",
        "lira_offline",
    )
    assert [a.name for a in DEFAULT_ATTACKS] == list(membership_attack_names()[:7])
    assert membership_attack_families()["lira"] == ("lira_online", "lira_offline")
    flags = {a.name: (a.needs_classifier, a.trains_models) for a in DEFAULT_ATTACKS}
    assert flags["loss"] == (False, False) and flags["learned"] == (True, False)
    assert flags["lira_online"] == flags["lira_offline"] == (True, True)


def test_resolve_expands_families_and_drops_repeats():
    names = [a.name for a in resolve_attacks(["entropy", "lira", "lira_online", "entropy"])]
    assert names == ["entropy", "lira_online", "lira_offline"]
    assert [a.name for a in resolve_attacks("loss")] == ["loss"]
    with pytest.raises(ValueError, match="`attacks` must be registered attack names.*'lira'"):
        resolve_attacks(("loss", "nope"))
    with pytest.raises(ValueError, match="`attacks` must be registered"):
        resolve_attacks([["loss"]])
    with pytest.raises(ValueError, match="`attacks` must be at least one attack name"):
        resolve_attacks(())
    with pytest.raises(ValueError, match="`attacks` must be an attack name or a list"):
        resolve_attacks(5)


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class _Margin(MembershipAttack):
    """Top probability minus the second: a score written independently in the test."""

    name = "margin"
    needs_classifier = True

    def score(self, context):
        out = []
        for x, _, _ in (context.members, context.non_members):
            p = np.sort(softmax(keras.ops.convert_to_numpy(context.model(x))), axis=1)
            out.append(p[:, -1] - p[:, -2])
        return tuple(out)


def test_a_registered_attack_runs_in_the_audit_and_the_callback(overfit, registry_guard):
    model, members, non_members = overfit
    assert register_membership_attack(_Margin) is _Margin
    assert "margin" in membership_attack_names()
    report = membership_inference(
        model, members, non_members, attacks=("loss", "margin"), slices=False
    )
    probs_in = np.sort(softmax(model.predict(members[0], verbose=0)), axis=1)
    probs_out = np.sort(softmax(model.predict(non_members[0], verbose=0)), axis=1)
    m_in, m_out = probs_in[:, -1] - probs_in[:, -2], probs_out[:, -1] - probs_out[:, -2]
    u = stats.mannwhitneyu(m_in, m_out).statistic
    assert report.get("margin")["auc"] == pytest.approx(u / (150 * 150), abs=1e-4)
    audit = MembershipInferenceAudit(members, non_members, attacks=("margin",), verbose=0)
    fresh = make_mlp(hidden=16)  # the session's overfitted model stays as it is
    history = fresh.fit(*members, epochs=1, verbose=0, callbacks=[audit])
    assert 0.0 <= history.history["mia_auc"][0] <= 1.0
    assert list(audit.reports[0][1].summary()) == ["margin"]
    unregister_membership_attack("margin")
    with pytest.raises(ValueError, match="got 'margin'"):
        membership_inference(model, members, non_members, attacks=("margin",))


def test_flags_are_enforced(overfit, registry_guard):
    model, members, non_members = overfit

    @register_membership_attack
    class Costly(MembershipAttack):
        name = "costly"
        family = "expensive"
        trains_models = True

        def score(self, context):
            return -context.member_features["loss"], -context.non_member_features["loss"]

    with pytest.raises(ValueError, match=r"train no models.*\['costly'\]"):
        MembershipInferenceAudit(members, non_members, attacks=("expensive",))
    report = membership_inference(model, members, non_members, attacks="expensive", slices=False)
    np.testing.assert_array_equal(report.scores["costly"][0], report.features["loss"][0] * -1)
    regression = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    regression.compile("sgd", "mse")
    register_membership_attack(_Margin)
    targets = np.linspace(-1.0, 1.0, 150)
    with pytest.raises(ValueError, match="classifier.*got 'margin'"):
        membership_inference(
            regression, (members[0], targets), (non_members[0], targets), attacks=("margin",)
        )


def test_registration_contract(registry_guard):
    class NoScore(MembershipAttack):
        name = "no_score"

    class Nameless(MembershipAttack):
        def score(self, context):
            return None

    class Clash(MembershipAttack):
        name = "lira"  # a family name

        def score(self, context):
            return None

    class FamilyClash(MembershipAttack):
        name = "other"
        family = "loss"  # an attack name

        def score(self, context):
            return None

    with pytest.raises(ValueError, match="`attack_class` must be a class that defines score"):
        register_membership_attack(NoScore)
    with pytest.raises(ValueError, match="`attack_class.name` must be a non-empty string"):
        register_membership_attack(Nameless)
    with pytest.raises(ValueError, match="not also an attack family"):
        register_membership_attack(Clash)
    with pytest.raises(ValueError, match="not also an attack family"):
        register_membership_attack(FamilyClash)
    with pytest.raises(ValueError, match="`attack_class` must be a subclass"):
        register_membership_attack(object)
    with pytest.raises(ValueError, match="not registered yet.*replace=True"):
        register_membership_attack(DEFAULT_ATTACKS[0])
    register_membership_attack(DEFAULT_ATTACKS[0], replace=True)
    unregister_membership_attack(DEFAULT_ATTACKS[0].name)  # the built-in one is back
    assert get_membership_attack("loss") is DEFAULT_ATTACKS[0]
    with pytest.raises(ValueError, match="built-in ones cannot be removed"):
        unregister_membership_attack("loss")
    with pytest.raises(ValueError, match="`name` must be a membership attack registered"):
        unregister_membership_attack("never_registered")
