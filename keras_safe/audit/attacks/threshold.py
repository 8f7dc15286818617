"""Threshold attacks: one per-example feature, thresholded.

- `loss`: minus the per-example loss (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018).
- `confidence`: probability of the true class (Salem et al., "ML-Leaks", NDSS 2019).
- `entropy`: minus the entropy of the prediction (Salem et al. 2019).
- `modified_entropy`: minus the label-aware entropy of Song & Mittal ("Systematic Evaluation of
  Privacy Risks of Machine Learning Models", USENIX Security 2021).
"""

from keras_safe.audit.attacks.base import MembershipAttack

__all__ = [
    "ConfidenceAttack",
    "EntropyAttack",
    "LossAttack",
    "ModifiedEntropyAttack",
    "ThresholdAttack",
]


class ThresholdAttack(MembershipAttack):
    """Scores every example by one feature times `sign` (+1 when larger means member)."""

    feature = None
    sign = 1.0

    def score(self, context):
        return (
            self.sign * context.member_features[self.feature],
            self.sign * context.non_member_features[self.feature],
        )


class LossAttack(ThresholdAttack):
    """Members have lower loss: the score is minus the training path's per-example loss."""

    name = "loss"
    feature = "loss"
    sign = -1.0


class ConfidenceAttack(ThresholdAttack):
    """Members get a higher probability of their true class."""

    name = "confidence"
    feature = "confidence"
    needs_classifier = True


class EntropyAttack(ThresholdAttack):
    """Members get more certain (lower entropy) predictions."""

    name = "entropy"
    feature = "entropy"
    sign = -1.0
    needs_classifier = True


class ModifiedEntropyAttack(ThresholdAttack):
    """Members get a lower label-aware entropy (Song & Mittal 2021)."""

    name = "modified_entropy"
    feature = "modified_entropy"
    sign = -1.0
    needs_classifier = True
