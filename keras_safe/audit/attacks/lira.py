"""LiRA, the Likelihood Ratio Attack of Carlini et al. ("Membership Inference Attacks From First
Principles", S&P 2022), with shadow models trained by the audit.

Shadow models of the audited model's architecture and recipe are trained on random halves of
the audit pool (members and non-members together); every example is IN for half of them. The
logit-scaled confidence of the true class of each shadow model on each example gives, per
example, a Gaussian for IN models and one for OUT models:

- `lira_online`: log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2);
- `lira_offline`: (phi - mu_out) / s_out, the one-sided test against the OUT Gaussian.

`attacks=("lira",)` runs both from the same shadow models.
"""

import numpy as np

from keras_safe._data import (
    Description,
    check_examples,
    concatenate_inputs,
    num_examples,
    take_inputs,
)
from keras_safe._validation import check_number, fail
from keras_safe.audit._models import check_model_factory, compiled_model
from keras_safe.audit.attacks.base import MembershipAttack
from keras_safe.audit.features import compute_features

__all__ = [
    "DEFAULT_SHADOW_FIT_KWARGS",
    "LiraOfflineAttack",
    "LiraOnlineAttack",
    "lira_scores",
    "train_shadow_models",
]

DEFAULT_SHADOW_FIT_KWARGS = {"epochs": 10, "batch_size": 32}


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
    sample_weight=None,
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
        sample_weight: optional weight of every pool example, passed to the shadow models'
            `fit` (train them as the audited model was trained).

    Returns:
        `(keep, observations)`: boolean `(num_shadows, n)` IN matrix and float
        `(num_shadows, n)` logit-scaled confidences of each shadow model on each example.

    Raises:
        ArgumentError: if `model_factory` is not callable or returns an uncompiled model, or
            `num_shadows` is below 2.
    """
    check_model_factory(model_factory, "LiRA's shadow models")
    num_shadows = check_number("num_shadows", num_shadows, low=2, integer=True)
    fit_kwargs = dict(DEFAULT_SHADOW_FIT_KWARGS if fit_kwargs is None else fit_kwargs)
    fit_kwargs.setdefault("verbose", 0)
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    n = num_examples(x)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    keep = _balanced_keep(num_shadows, n, rng)
    if extra_data is not None:
        extra_x, extra_y, extra_w = check_examples("shadow_data", extra_data)
        n_extra = num_examples(extra_x)
        if (weights is None) != (extra_w is None):
            weights = np.ones(n) if weights is None else weights
            extra_w = np.ones(n_extra) if extra_w is None else extra_w
    observations = np.zeros((num_shadows, n), dtype=np.float64)
    for s in range(num_shadows):
        idx = np.flatnonzero(keep[s])
        train_x, train_y = take_inputs(x, idx), y[idx]
        train_w = None if weights is None else weights[idx]
        if extra_data is not None:
            chosen = np.flatnonzero(rng.random(n_extra) < 0.5)
            train_x = concatenate_inputs([train_x, take_inputs(extra_x, chosen)])
            train_y = np.concatenate([train_y, extra_y[chosen]])
            if train_w is not None:
                train_w = np.concatenate([train_w, extra_w[chosen]])
        order = rng.permutation(len(train_y))
        shadow = compiled_model(model_factory)
        if train_w is not None:
            fit_kwargs["sample_weight"] = train_w[order]
        shadow.fit(take_inputs(train_x, order), train_y[order], **fit_kwargs)
        observed = compute_features(
            shadow, x, y, loss_fn=loss_fn, from_logits=from_logits, batch_size=batch_size
        )
        if "logit_confidence" not in observed:
            fail(
                "model_factory",
                model_factory,
                "a factory of classifiers (class probabilities or logits as output) for LiRA",
                "use attacks=('loss',) for a model that is not a classifier.",
            )
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
        ArgumentError: if an example lacks the IN / OUT observations its variant needs.
    """
    keep = np.asarray(keep, dtype=bool)
    obs = np.asarray(observations, dtype=np.float64)
    phi = np.asarray(target_observations, dtype=np.float64)
    n_in, n_out = keep.sum(axis=0), (~keep).sum(axis=0)
    need = 1 if fix_variance else 2
    if np.any(n_out < need) or (online and np.any(n_in < need)):
        fail(
            "num_shadows",
            Description(
                f"shadow models giving some example only {int(n_in.min())} IN and "
                f"{int(n_out.min())} OUT observations"
            ),
            f"enough shadow models for {need} IN and {need} OUT observations per example",
            "pass more `num_shadows` (>= 4) or lira_fix_variance=True.",
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


class _Lira(MembershipAttack):
    family = "lira"
    needs_classifier = True
    trains_models = True
    online = True

    def score(self, context):
        settings = context.settings
        num_shadows = settings.get("num_shadows", 8)
        fix = settings.get("lira_fix_variance")
        fix = (int(num_shadows) < 64) if fix is None else bool(fix)
        keep, observations = context.shared("lira_shadows", lambda: _train(context))
        target = np.concatenate(
            [
                context.member_features["logit_confidence"],
                context.non_member_features["logit_confidence"],
            ]
        )
        values = lira_scores(target, keep, observations, online=self.online, fix_variance=fix)
        context.metadata.update(num_shadows=int(num_shadows), lira_fix_variance=fix)
        n_in = len(context.member_features["logit_confidence"])
        return values[:n_in], values[n_in:]


def _train(context):
    settings = context.settings
    (x_in, y_in, w_in), (x_out, y_out, w_out) = context.members, context.non_members
    weights = None
    if w_in is not None or w_out is not None:
        weights = np.concatenate(
            [
                np.ones(len(y_in)) if w_in is None else w_in,
                np.ones(len(y_out)) if w_out is None else w_out,
            ]
        )
    return train_shadow_models(
        settings.get("model_factory"),
        concatenate_inputs([x_in, x_out]),
        np.concatenate([y_in, y_out]),
        num_shadows=settings.get("num_shadows", 8),
        fit_kwargs=settings.get("shadow_fit_kwargs"),
        extra_data=settings.get("shadow_data"),
        loss_fn=settings.get("loss_fn"),
        from_logits=settings.get("from_logits"),
        batch_size=settings.get("batch_size", 256),
        seed=settings.get("seed", 0),
        sample_weight=weights,
    )


class LiraOnlineAttack(_Lira):
    """`lira_online`: likelihood ratio of the IN and OUT Gaussians."""

    name = "lira_online"
    online = True


class LiraOfflineAttack(_Lira):
    """`lira_offline`: one-sided test against the OUT Gaussian only."""

    name = "lira_offline"
    online = False
