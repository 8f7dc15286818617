"""The learned attack: a classifier on the per-example features, scored out of fold.

A scikit-learn classifier learns membership from all per-example features (loss, confidence,
entropies, logit-scaled confidence, largest probability, correctness), in the spirit of the
attack models of Shokri et al. ("Membership Inference Attacks Against Machine Learning Models",
S&P 2017) trained on the audited model's own outputs. Every example is scored by a model fitted
on the other cross-validation folds, so no example is scored by a model trained on it.
"""

import numpy as np

from keras_safe._validation import check_number, fail
from keras_safe.audit.attacks.base import MembershipAttack

__all__ = ["LEARNED_FEATURES", "LearnedAttack", "learned_scores"]

#: The per-example features the learned attack reads (those the model provides).
LEARNED_FEATURES = (
    "loss",
    "confidence",
    "entropy",
    "modified_entropy",
    "logit_confidence",
    "max_probability",
    "correct",
)


def _make_learner(learner, seed):
    from sklearn.base import clone

    if learner == "logistic":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if learner == "gradient_boosting":
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(random_state=seed)
    if hasattr(learner, "fit") and hasattr(learner, "predict_proba"):
        return clone(learner)
    fail(
        "learned_attack_model",
        learner,
        "'logistic', 'gradient_boosting' or a scikit-learn classifier with predict_proba",
        "pass learned_attack_model='logistic'.",
    )


def learned_scores(member_features, non_member_features, learner="logistic", cv_folds=5, seed=0):
    """Out-of-fold membership scores of a classifier trained on per-example features.

    Args:
        member_features: 2-D array, one row of features per member.
        non_member_features: 2-D array, one row per non-member.
        learner: `"logistic"` (standardised logistic regression), `"gradient_boosting"` or a
            scikit-learn classifier with `predict_proba` (cloned, never fitted in place).
        cv_folds: number of stratified cross-validation folds (>= 2).
        seed: seed of the fold shuffling.

    Returns:
        `(member_scores, non_member_scores)`: predicted member probabilities, each example scored
        by the fold model that did not see it.

    Raises:
        ArgumentError: if `cv_folds` is below 2 or a group has fewer examples than `cv_folds`.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    members = np.asarray(member_features, dtype=np.float64)
    non_members = np.asarray(non_member_features, dtype=np.float64)
    cv_folds = check_number("cv_folds", cv_folds, low=2, integer=True)
    if min(len(members), len(non_members)) < cv_folds:
        fail(
            "cv_folds",
            cv_folds,
            f"at most the number of members ({len(members)}) and of non-members "
            f"({len(non_members)}) for the learned attack",
            "pass more examples or a smaller `cv_folds`.",
        )
    x = np.concatenate([members, non_members])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(
        _make_learner(learner, seed), x, labels, cv=folds, method="predict_proba"
    )[:, 1]
    return proba[: len(members)], proba[len(members) :]


class LearnedAttack(MembershipAttack):
    """`learned`: `learned_scores` on the features the model provides."""

    name = "learned"
    needs_classifier = True

    def score(self, context):
        learner = context.settings.get("learned_attack_model", "logistic")
        columns = [c for c in LEARNED_FEATURES if c in context.member_features]
        context.metadata["learned_attack_model"] = learner if isinstance(learner, str) else "custom"
        return learned_scores(
            np.stack([context.member_features[c] for c in columns], axis=1),
            np.stack([context.non_member_features[c] for c in columns], axis=1),
            learner=learner,
            cv_folds=context.settings.get("cv_folds", 5),
            seed=context.settings.get("seed", 0),
        )
