"""`membership_inference`, the audit entry point: features, attacks, metrics per slice.

It computes the per-example features of the members and non-members once
(`keras_safe.audit.features`), lets every requested attack of the registry
(`keras_safe.audit.attacks`) score them, and reports the metrics of every attack on the whole
audit set and on slices (per class, correctly / incorrectly classified).
"""

import numpy as np

from keras_safe._data import check_examples
from keras_safe._validation import check_number, check_probability, fail
from keras_safe.audit._models import audit_delta
from keras_safe.audit.attacks.base import AttackContext
from keras_safe.audit.attacks.registry import resolve_attacks
from keras_safe.audit.features import compute_features
from keras_safe.audit.metrics import attack_metrics
from keras_safe.audit.report import AuditReport

__all__ = ["REPORT_FEATURES", "membership_inference"]

#: Per-example features kept in the report (for histograms).
REPORT_FEATURES = ("loss", "confidence", "entropy", "logit_confidence")


def _slice_masks(member_features, non_member_features, slices, min_slice_size):
    """Yields (name, member_mask, non_member_mask) for every slice."""
    n_in = len(member_features["loss"])
    n_out = len(non_member_features["loss"])
    yield "all", np.ones(n_in, bool), np.ones(n_out, bool)
    if not slices or "label" not in member_features:
        return
    labels_in, labels_out = member_features["label"], non_member_features["label"]
    for k in np.unique(np.concatenate([labels_in, labels_out])).astype(int):
        m_in, m_out = labels_in == k, labels_out == k
        if min(m_in.sum(), m_out.sum()) >= min_slice_size:
            yield f"class={k}", m_in, m_out
    for name, value in (("correct", 1.0), ("incorrect", 0.0)):
        m_in = member_features["correct"] == value
        m_out = non_member_features["correct"] == value
        if min(m_in.sum(), m_out.sum()) >= min_slice_size:
            yield name, m_in, m_out


def membership_inference(
    model,
    members,
    non_members,
    attacks=("loss", "confidence", "entropy", "learned"),
    *,
    loss_fn=None,
    from_logits=None,
    batch_size=256,
    slices=True,
    min_slice_size=10,
    delta=None,
    confidence_level=0.95,
    learned_attack_model="logistic",
    cv_folds=5,
    model_factory=None,
    num_shadows=8,
    shadow_fit_kwargs=None,
    shadow_data=None,
    lira_fix_variance=None,
    seed=0,
):
    """Audits how well an attacker can tell training members from non-members.

    The loss is the training path's per-example loss (`keras_safe.privacy.losses`), with the
    examples' sample weights, the output mask and the compiled loss weights, so the model is
    audited on the loss it was trained on; `loss_fn` replaces the compiled loss, and a
    classifier that was never compiled gets crossentropy (see `keras_safe.audit.features`).

    Args:
        model: the trained Keras model (one output).
        members: `(x, y)` or `(x, y, sample_weight)` examples the model trained on.
        non_members: the same for examples from the same distribution it did not train on.
        attacks: names of registered attacks (`keras_safe.audit.membership_attack_names()`): `loss`,
            `confidence`, `entropy`, `modified_entropy`, `learned`, `lira_online`,
            `lira_offline`, or a family such as `lira` (both LiRA variants from the same
            shadow models). `keras_safe.audit.register_membership_attack` adds attacks.
        loss_fn: optional per-example loss overriding the compiled loss.
        from_logits: whether the model outputs logits (None: read from the loss or guess).
        batch_size: prediction batch size.
        slices: also report per class and for correctly / incorrectly classified examples.
        min_slice_size: smallest number of members and of non-members for a slice to be reported.
        delta: delta of the empirical epsilon bounds (default: the model's DP optimizer delta,
            else 1e-5).
        confidence_level: confidence of the Clopper-Pearson intervals.
        learned_attack_model: `"logistic"`, `"gradient_boosting"` or a scikit-learn classifier.
        cv_folds: cross-validation folds of the learned attack.
        model_factory: for LiRA, a zero-argument callable returning a new compiled model with
            the audited model's architecture and optimizer.
        num_shadows: number of LiRA shadow models; each example is IN for half of them.
        shadow_fit_kwargs: `fit` arguments of the shadow models (default
            `{"epochs": 10, "batch_size": 32}`); match the audited model's training.
        shadow_data: optional extra `(x, y)` from the same distribution for the shadow models.
        lira_fix_variance: one variance for all examples; default True below 64 shadow models,
            as Carlini et al. 2022 recommend for small shadow counts.
        seed: seed of the cross-validation folds and of the shadow IN/OUT assignment.

    Returns:
        An `AuditReport`.

    Raises:
        ArgumentError: on malformed data, unknown attacks, an attack that needs a classifier
            on a model that is not one, LiRA without `model_factory`, or settings out of range.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.audit import membership_inference
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(200, 8)), rng.integers(0, 2, size=200)
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> _ = model.fit(x[:100], y[:100], epochs=2, verbose=0)
        >>> report = membership_inference(model, (x[:100], y[:100]), (x[100:], y[100:]),
        ...                               attacks=("loss", "confidence"))
        >>> sorted(report.summary())
        ['confidence', 'loss']
    """
    members = check_examples("members", members)
    non_members = check_examples("non_members", non_members)
    chosen = resolve_attacks(attacks)
    if delta is None:
        delta = audit_delta(model)
    delta = check_number("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    confidence_level = check_probability("confidence_level", confidence_level)
    min_slice_size = check_number("min_slice_size", min_slice_size, low=1, integer=True)

    common = dict(loss_fn=loss_fn, from_logits=from_logits, batch_size=batch_size)
    feat_in = compute_features(model, *members[:2], sample_weight=members[2], **common)
    feat_out = compute_features(model, *non_members[:2], sample_weight=non_members[2], **common)
    metadata = {"delta": delta, "confidence_level": confidence_level}
    context = AttackContext(
        model,
        members,
        non_members,
        feat_in,
        feat_out,
        settings=dict(
            common,
            seed=seed,
            learned_attack_model=learned_attack_model,
            cv_folds=cv_folds,
            model_factory=model_factory,
            num_shadows=num_shadows,
            shadow_fit_kwargs=shadow_fit_kwargs,
            shadow_data=shadow_data,
            lira_fix_variance=lira_fix_variance,
        ),
        metadata=metadata,
    )
    for attack in chosen:
        if attack.needs_classifier and not context.is_classifier:
            fail(
                "attacks",
                attack.name,
                "attacks that need no classifier, since the model does not output class "
                "probabilities or logits",
                "use attacks=('loss',) for this model.",
            )

    scores = {}
    for attack in chosen:
        s_in, s_out = attack.score(context)
        scores[attack.name] = (np.asarray(s_in, np.float64), np.asarray(s_out, np.float64))

    results = []
    for slice_name, m_in, m_out in _slice_masks(feat_in, feat_out, slices, min_slice_size):
        for name, (s_in, s_out) in scores.items():
            row = {"attack": name, "slice": slice_name}
            row.update(
                attack_metrics(
                    s_in[m_in], s_out[m_out], delta=delta, confidence_level=confidence_level
                )
            )
            results.append(row)
    report_features = {k: (feat_in[k], feat_out[k]) for k in REPORT_FEATURES if k in feat_in}
    return AuditReport(results, scores=scores, features=report_features, metadata=metadata)
