"""AttackContext: shared work runs once per audit; the classifier flag follows the features."""

import numpy as np
import pytest

from keras_safe.audit import AttackContext, MembershipAttack


def test_shared_work_runs_once_and_flags_follow_the_features():
    calls = []

    def train():
        calls.append(1)
        return len(calls)

    context = AttackContext(None, None, None, {"loss": np.zeros(2)}, {"loss": np.zeros(2)})
    assert context.shared("shadows", train) == 1
    assert context.shared("shadows", train) == 1 and len(calls) == 1
    assert context.shared("other", train) == 2
    assert not context.is_classifier
    classifier = AttackContext(None, None, None, {"confidence": np.ones(1)}, {})
    assert classifier.is_classifier and classifier.settings == {} and classifier.metadata == {}


def test_an_attack_without_score_says_so():
    class Unfinished(MembershipAttack):
        name = "unfinished"

    with pytest.raises(NotImplementedError, match="Unfinished does not define score"):
        Unfinished().score(None)
