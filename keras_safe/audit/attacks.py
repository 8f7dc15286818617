"""Membership inference attacks and `membership_inference`, the audit entry point.

Attacks (every score is "larger = more likely a member"):

- `loss`: minus the per-example loss (Yeom et al. 2018).
- `confidence`: probability of the true class (Salem et al. 2019).
- `entropy`: minus the entropy of the prediction (Salem et al. 2019).
- `modified_entropy`: minus the label-aware entropy of Song & Mittal 2021.
- `learned`: a scikit-learn classifier on the per-example features, scored out of fold with
  stratified cross-validation so that no example is scored by a model trained on it.
- `lira_online` / `lira_offline` (`lira` runs both): the Likelihood Ratio Attack of Carlini et al.
  2022 ("Membership Inference Attacks From First Principles") with shadow models.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_safe.audit import features as _features
from keras_safe.audit.metrics import attack_metrics
from keras_safe.audit.report import AuditReport

THRESHOLD_ATTACKS = ("loss", "confidence", "entropy", "modified_entropy")
KNOWN_ATTACKS = THRESHOLD_ATTACKS + ("learned", "lira", "lira_online", "lira_offline")
_CLASSIFIER_ATTACKS = ("confidence", "entropy", "modified_entropy", "learned")
_LEARNED_FEATURES = (
    "loss",
    "confidence",
    "entropy",
    "modified_entropy",
    "logit_confidence",
    "max_probability",
    "correct",
)
DEFAULT_SHADOW_FIT_KWARGS = {"epochs": 10, "batch_size": 32}


def threshold_scores(attack, feature_values):
    """Scores of a threshold attack from a dict of per-example features."""
    if attack == "loss":
        return -feature_values["loss"]
    if attack == "confidence":
        return feature_values["confidence"]
    if attack == "entropy":
        return -feature_values["entropy"]
    if attack == "modified_entropy":
        return -feature_values["modified_entropy"]
    raise ValueError(f"Unknown threshold attack {attack!r}; known: {THRESHOLD_ATTACKS}.")


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
    raise ValueError(
        f"`learned_attack_model` must be 'logistic', 'gradient_boosting' or a scikit-learn "
        f"classifier with predict_proba, got {learner!r}."
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
        ValueError: if a group has fewer examples than `cv_folds`.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    members = np.asarray(member_features, dtype=np.float64)
    non_members = np.asarray(non_member_features, dtype=np.float64)
    cv_folds = int(cv_folds)
    if cv_folds < 2:
        raise ValueError(f"`cv_folds` must be >= 2, got {cv_folds}.")
    if min(len(members), len(non_members)) < cv_folds:
        raise ValueError(
            f"The learned attack needs at least cv_folds={cv_folds} members and non-members, "
            f"got {len(members)} and {len(non_members)}. Fix: pass more examples or a smaller "
            "`cv_folds`."
        )
    x = np.concatenate([members, non_members])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(
        _make_learner(learner, seed), x, labels, cv=folds, method="predict_proba"
    )[:, 1]
    return proba[: len(members)], proba[len(members) :]


def _balanced_keep(num_shadows, n, rng):
    """IN/OUT matrix (num_shadows, n): every example is IN for half of the shadow models."""
    keep = np.zeros((num_shadows, n), dtype=bool)
    half = num_shadows // 2
    for i in range(n):
        count = half + (rng.random() < 0.5 if num_shadows % 2 else 0)
        keep[rng.permutation(num_shadows)[:count], i] = True
    return keep


def train_shadow_models(
    model_factory,
    x,
    y,
    num_shadows=8,
    fit_kwargs=None,
    extra_data=None,
    loss_fn=None,
    from_logits=None,
    batch_size=256,
    seed=0,
):
    """Trains shadow models on random halves of `(x, y)` and records their logit confidences.

    Every example is IN the training set of exactly half of the shadow models (a random half,
    Carlini et al. 2022); with `extra_data` each shadow model also trains on a random half of it.

    Args:
        model_factory: zero-argument callable returning a new, compiled Keras model of the same
            architecture and training recipe as the audited model.
        x: inputs of the audit pool (members and non-members of the audited model).
        y: labels of the audit pool.
        num_shadows: number of shadow models (>= 2).
        fit_kwargs: keyword arguments of `model.fit` for each shadow model.
        extra_data: optional `(x, y)` of further examples from the same distribution.
        loss_fn: passed to the feature computation (see `compute_features`).
        from_logits: passed to the feature computation.
        batch_size: prediction batch size.
        seed: seed of the IN/OUT assignment.

    Returns:
        `(keep, observations)`: boolean `(num_shadows, n)` IN matrix and float
        `(num_shadows, n)` logit-scaled confidences of each shadow model on each example.

    Raises:
        ValueError: if `model_factory` is not callable or returns an uncompiled model.
    """
    if not callable(model_factory) or isinstance(model_factory, keras.Model):
        raise ValueError(
            "LiRA needs `model_factory`: a zero-argument function returning a new compiled model "
            "trained the same way as the audited one. Fix: pass model_factory=make_model."
        )
    num_shadows = int(num_shadows)
    if num_shadows < 2:
        raise ValueError(f"`num_shadows` must be >= 2, got {num_shadows}.")
    fit_kwargs = dict(DEFAULT_SHADOW_FIT_KWARGS if fit_kwargs is None else fit_kwargs)
    fit_kwargs.setdefault("verbose", 0)
    rng = np.random.default_rng(seed)
    n = _features.num_examples(x)
    keep = _balanced_keep(num_shadows, n, rng)
    if extra_data is not None:
        extra_x, extra_y = _features.check_pair("shadow_data", extra_data)
        n_extra = _features.num_examples(extra_x)
    observations = np.zeros((num_shadows, n), dtype=np.float64)
    for s in range(num_shadows):
        idx = np.flatnonzero(keep[s])
        train_x, train_y = _features.take(x, idx), np.asarray(y)[idx]
        if extra_data is not None:
            chosen = np.flatnonzero(rng.random(n_extra) < 0.5)
            train_x = _features.concatenate([train_x, _features.take(extra_x, chosen)])
            train_y = np.concatenate([train_y, extra_y[chosen]])
        order = rng.permutation(len(train_y))
        shadow = model_factory()
        if getattr(shadow, "optimizer", None) is None:
            raise ValueError(
                "`model_factory` returned a model that is not compiled. Fix: call "
                "model.compile(optimizer=..., loss=...) inside the factory."
            )
        shadow.fit(_features.take(train_x, order), train_y[order], **fit_kwargs)
        observed = _features.compute_features(
            shadow, x, y, loss_fn=loss_fn, from_logits=from_logits, batch_size=batch_size
        )
        if "logit_confidence" not in observed:
            raise ValueError("LiRA needs a classifier (class probabilities or logits as output).")
        observations[s] = observed["logit_confidence"]
    return keep, observations


def lira_scores(target_observations, keep, observations, online=True, fix_variance=False):
    """LiRA membership scores from shadow-model observations (Carlini et al. 2022).

    Online: log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2), Gaussians fitted to the
    logit-scaled confidences of the shadow models that did / did not train on the example.
    Offline: (phi - mu_out) / s_out, the one-sided test against the OUT Gaussian (monotone in
    the paper's Pr[Z < phi]).

    Args:
        target_observations: `(n,)` logit-scaled confidences of the audited model.
        keep: boolean `(num_shadows, n)` IN matrix.
        observations: `(num_shadows, n)` shadow logit-scaled confidences.
        online: whether to use the IN models too.
        fix_variance: use one variance for all examples (recommended with few shadow models).

    Returns:
        A float array of `n` scores.

    Raises:
        ValueError: if an example lacks the IN / OUT observations its variant needs.
    """
    keep = np.asarray(keep, dtype=bool)
    obs = np.asarray(observations, dtype=np.float64)
    phi = np.asarray(target_observations, dtype=np.float64)
    n_in, n_out = keep.sum(axis=0), (~keep).sum(axis=0)
    need = 1 if fix_variance else 2
    if np.any(n_out < need) or (online and np.any(n_in < need)):
        raise ValueError(
            f"Each example needs at least {need} IN and OUT shadow observations; got at least "
            f"{int(n_in.min())} IN and {int(n_out.min())} OUT. Fix: pass more `num_shadows` "
            "(>= 4) or lira_fix_variance=True."
        )

    def fit(mask):
        count = mask.sum(axis=0)
        mean = np.where(mask, obs, 0.0).sum(axis=0) / np.maximum(count, 1)
        sq = np.where(mask, (obs - mean) ** 2, 0.0)
        if fix_variance:
            std = np.sqrt(sq.sum() / max(mask.sum() - 1, 1)) * np.ones_like(mean)
        else:
            std = np.sqrt(sq.sum(axis=0) / np.maximum(count - 1, 1))
        return mean, np.maximum(std, 1e-6)

    mean_out, std_out = fit(~keep)
    if not online:
        return (phi - mean_out) / std_out
    mean_in, std_in = fit(keep)

    def log_normal(value, mean, std):
        return -0.5 * ((value - mean) / std) ** 2 - np.log(std)

    return log_normal(phi, mean_in, std_in) - log_normal(phi, mean_out, std_out)


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


def _default_delta(model):
    try:
        from keras_safe.privacy import find_dp_optimizer
    except ImportError:
        return 1e-5
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    delta = getattr(dp, "delta", None) if dp is not None else None
    return float(delta) if delta else 1e-5


def _expand_attacks(attacks):
    if isinstance(attacks, str):
        attacks = (attacks,)
    expanded = []
    for attack in attacks:
        if attack not in KNOWN_ATTACKS:
            raise ValueError(
                f"Unknown attack {attack!r}. Fix: choose among {KNOWN_ATTACKS} "
                "('lira' runs lira_online and lira_offline)."
            )
        names = ("lira_online", "lira_offline") if attack == "lira" else (attack,)
        for name in names:
            if name not in expanded:
                expanded.append(name)
    if not expanded:
        raise ValueError("`attacks` is empty. Fix: pass e.g. attacks=('loss',).")
    return expanded


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

    The loss is the one given by `loss_fn`, else the model's compiled loss, else sparse
    categorical crossentropy for classifiers (categorical crossentropy for one-hot labels);
    see `keras_safe.audit.features`.

    Args:
        model: the trained Keras model (one output).
        members: `(x, y)` examples the model trained on.
        non_members: `(x, y)` examples from the same distribution it did not train on.
        attacks: names among `loss`, `confidence`, `entropy`, `modified_entropy`, `learned`,
            `lira_online`, `lira_offline` and `lira` (both LiRA variants from the same shadows).
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
        ValueError: on malformed data, unknown attacks, an attack that needs a classifier on a
            model that is not one, or LiRA without `model_factory`.

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
    x_in, y_in = _features.check_pair("members", members)
    x_out, y_out = _features.check_pair("non_members", non_members)
    names = _expand_attacks(attacks)
    if delta is None:
        delta = _default_delta(model)
    min_slice_size = max(int(min_slice_size), 1)

    common = dict(loss_fn=loss_fn, from_logits=from_logits, batch_size=batch_size)
    feat_in = _features.compute_features(model, x_in, y_in, **common)
    feat_out = _features.compute_features(model, x_out, y_out, **common)
    is_classifier = "confidence" in feat_in
    for name in names:
        if not is_classifier and (name in _CLASSIFIER_ATTACKS or name.startswith("lira")):
            raise ValueError(
                f"The {name!r} attack needs a classifier (class probabilities or logits as "
                "output). Fix: use attacks=('loss',) for this model."
            )

    scores = {}
    metadata = {"delta": float(delta), "confidence_level": float(confidence_level)}
    for name in names:
        if name in THRESHOLD_ATTACKS:
            scores[name] = (threshold_scores(name, feat_in), threshold_scores(name, feat_out))
        elif name == "learned":
            columns = [c for c in _LEARNED_FEATURES if c in feat_in]
            scores[name] = learned_scores(
                np.stack([feat_in[c] for c in columns], axis=1),
                np.stack([feat_out[c] for c in columns], axis=1),
                learner=learned_attack_model,
                cv_folds=cv_folds,
                seed=seed,
            )
            metadata["learned_attack_model"] = (
                learned_attack_model if isinstance(learned_attack_model, str) else "custom"
            )
    lira_names = [n for n in names if n.startswith("lira")]
    if lira_names:
        pool_x = _features.concatenate([x_in, x_out])
        pool_y = np.concatenate([y_in, y_out])
        keep, obs = train_shadow_models(
            model_factory,
            pool_x,
            pool_y,
            num_shadows=num_shadows,
            fit_kwargs=shadow_fit_kwargs,
            extra_data=shadow_data,
            seed=seed,
            **common,
        )
        fix = (int(num_shadows) < 64) if lira_fix_variance is None else bool(lira_fix_variance)
        target = np.concatenate([feat_in["logit_confidence"], feat_out["logit_confidence"]])
        n_in = len(y_in)
        for name in lira_names:
            values = lira_scores(target, keep, obs, online=name == "lira_online", fix_variance=fix)
            scores[name] = (values[:n_in], values[n_in:])
        metadata.update(num_shadows=int(num_shadows), lira_fix_variance=fix)

    results = []
    for slice_name, m_in, m_out in _slice_masks(feat_in, feat_out, slices, min_slice_size):
        for name in names:
            s_in, s_out = scores[name]
            row = {"attack": name, "slice": slice_name}
            row.update(
                attack_metrics(
                    s_in[m_in], s_out[m_out], delta=delta, confidence_level=confidence_level
                )
            )
            results.append(row)
    kept = ("loss", "confidence", "entropy", "logit_confidence")
    report_features = {k: (feat_in[k], feat_out[k]) for k in kept if k in feat_in}
    return AuditReport(results, scores=scores, features=report_features, metadata=metadata)
