"""Canary audit: an empirical epsilon lower bound for a DP training recipe.

The audit follows Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1) Training Run"):

1. `num_canaries` canaries are made (by default, training examples given a wrong label; their
   correctly labelled originals are removed from the training data).
2. Each canary is included in the training data independently with probability 1/2.
3. A model is trained on the data plus the included canaries (the audited run) and, with
   `reference=True`, a second model on the data without any canary (the reference run).
4. Each canary is scored by how much lower its loss is under the audited model than under the
   reference model; the auditor guesses "included" for the top scores and "excluded" for the
   bottom scores and abstains on the rest.
5. The number of correct guesses gives, through the paper's hypothesis test, the largest epsilon
   that (epsilon, delta)-DP is refuted for, with the requested confidence. Several numbers of
   guesses are tried and the significance is split between them (Bonferroni), so the bound holds
   for the best of them.

For a correct DP-SGD implementation the bound stays below the accountant's epsilon with
probability at least `confidence_level`; a bound above it is evidence of a privacy bug.

With `users` (one user id per training example) the unit is a user: each canary is a canary user
with `examples_per_canary` examples under a fresh id, included or excluded with all of them, the
training runs get the user ids of their rows, a canary user's score is the mean of their
examples' scores, and the same test over canary users gives a user-level lower bound, held
against the accountant's user-level epsilon (the ledger's own for `privacy_unit="user"`, the
group-privacy figure of Mironov 2017, Prop. 2, for example-level training).
"""

import math

import numpy as np

from keras_safe._data import Description, check_examples
from keras_safe._validation import check_choice, check_number, check_probability, fail
from keras_safe.accounting.group import MAX_GROUP_SIZE, group_epsilon_of_segments
from keras_safe.audit._models import audit_delta, check_model_factory, compiled_model
from keras_safe.audit.features import class_labels, example_losses
from keras_safe.audit.metrics import attack_metrics, guessing_epsilon_lower_bound
from keras_safe.privacy.ledger import get_ledger

__all__ = [
    "DEFAULT_FIT_KWARGS",
    "CanaryAuditResult",
    "accountant_epsilon",
    "canary_audit",
    "user_accountant_epsilon",
]

DEFAULT_FIT_KWARGS = {"epochs": 10, "batch_size": 32}


def accountant_epsilon(model, delta, accountant="rdp"):
    """The epsilon a model's privacy ledger has spent, or None for a model trained without DP.

    The ledger (`keras_safe.privacy.get_ledger`) is charged by keras_safe's train step at every
    noisy step, with the sampling rate and noise each step really had, so this is the same
    figure `keras_safe.callbacks.PrivacyBudget` reports.

    Args:
        model: a Keras model.
        delta: the delta of the guarantee, in (0, 1).
        accountant: `"rdp"`, `"pld"` or another registered accountant.

    Returns:
        The epsilon as a float, or None when the model has no privacy ledger.

    Example:
        >>> import keras
        >>> accountant_epsilon(keras.Sequential([keras.Input((2,))]), 1e-5) is None
        True
    """
    ledger = get_ledger(model)
    if ledger is None:
        return None
    return ledger.epsilon(delta, accountant)


class CanaryAuditResult:
    """Outcome of `canary_audit`.

    Attributes:
        epsilon_lower_bound: the empirical epsilon lower bound (holds with `confidence_level`).
        accountant_epsilon: epsilon reported by the DP optimizer's accountant, or None.
        delta: the delta of both figures.
        confidence_level: confidence of the lower bound.
        num_canaries: number of canaries; `included` tells which ones were trained on.
        scores: membership score of every canary (larger = more likely included).
        best_test: the guessing test that gave the bound (`num_guesses`, `num_correct`, ...).
        tests: every guessing test tried.
        auc: ROC AUC of the canary scores (included vs excluded canaries).
        privacy_unit: `"example"` (each canary one example) or `"user"` (each canary a user
            with `examples_per_canary` examples; the bound and the accountant's epsilon are
            then user-level).
        examples_per_canary: the examples of each canary (1 for example-level audits).
    """

    def __init__(
        self,
        epsilon_lower_bound,
        accountant_epsilon,
        delta,
        confidence_level,
        scores,
        included,
        tests,
        auc,
        privacy_unit="example",
        examples_per_canary=1,
    ):
        self.epsilon_lower_bound = float(epsilon_lower_bound)
        self.accountant_epsilon = None if accountant_epsilon is None else float(accountant_epsilon)
        self.delta = float(delta)
        self.confidence_level = float(confidence_level)
        self.scores = np.asarray(scores, dtype=np.float64)
        self.included = np.asarray(included, dtype=bool)
        self.tests = list(tests)
        self.auc = float(auc)
        self.best_test = max(self.tests, key=lambda t: t["epsilon_lower_bound"])
        self.privacy_unit = check_choice("privacy_unit", privacy_unit, ("example", "user"))
        self.examples_per_canary = int(examples_per_canary)

    @property
    def num_canaries(self):
        """Number of canaries."""
        return int(self.scores.size)

    @property
    def within_accountant_bound(self):
        """True when the empirical bound does not exceed the accountant's epsilon (or no DP)."""
        return self.accountant_epsilon is None or (
            self.epsilon_lower_bound <= self.accountant_epsilon + 1e-9
        )

    def to_dict(self):
        """A JSON-friendly dict of the figures (without the per-canary scores)."""
        return {
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "accountant_epsilon": self.accountant_epsilon,
            "delta": self.delta,
            "confidence_level": self.confidence_level,
            "num_canaries": self.num_canaries,
            "num_included": int(self.included.sum()),
            "auc": self.auc,
            "best_test": dict(self.best_test),
            "within_accountant_bound": self.within_accountant_bound,
            "privacy_unit": self.privacy_unit,
            "examples_per_canary": self.examples_per_canary,
        }

    def __str__(self):
        best = self.best_test
        user = self.privacy_unit == "user"
        level = "user-level " if user else ""
        accountant = (
            "no DP optimizer found"
            if self.accountant_epsilon is None
            else f"accountant {level}epsilon {self.accountant_epsilon:.3f}"
        )
        verdict = "" if self.within_accountant_bound else "  ** EXCEEDS THE ACCOUNTANT **"
        canaries = (
            f"{self.num_canaries} canary users of {self.examples_per_canary} example(s)"
            if user
            else f"{self.num_canaries} canaries"
        )
        return (
            f"Canary audit: {canaries} ({int(self.included.sum())} included), "
            f"canary AUC {self.auc:.3f}\n"
            f"  empirical {level}epsilon >= {self.epsilon_lower_bound:.3f} at delta={self.delta:g} "
            f"({100 * self.confidence_level:g}% confidence; {best['num_correct']}/"
            f"{best['num_guesses']} correct guesses); {accountant}{verdict}"
        )

    __repr__ = __str__


def _num_classes(y):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return int(y.shape[1])
    return int(np.max(y)) + 1 if y.size else 0


def _with_labels(y_like, labels, num_classes):
    """Labels in the same format as `y_like` (one-hot or indices)."""
    y_like = np.asarray(y_like)
    if y_like.ndim == 2 and y_like.shape[1] > 1:
        return np.eye(num_classes, dtype=y_like.dtype)[labels]
    return labels.astype(y_like.dtype).reshape((-1,) + y_like.shape[1:])


def _check_fractions(guess_fractions):
    """`guess_fractions` as a tuple of floats in (0, 1], or an `ArgumentError`."""
    try:
        fractions = tuple(float(f) for f in guess_fractions)
        ok = bool(fractions) and all(0.0 < f <= 1.0 for f in fractions)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fail(
            "guess_fractions",
            guess_fractions,
            "a non-empty sequence of fractions in (0, 1]",
            "pass for example (0.05, 0.1, 0.2, 0.5, 1.0).",
        )
    return fractions


def _make_canaries(rng, x, y, m, num_classes, canary_type):
    """`m` canaries and the data they join: `(canary_x, canary_y, base_x, base_y, rest)`,
    `rest` the indices of the rows of `x` in the base data.

    `"mislabel"`: training examples given a random wrong label, their originals removed from
    the base data; `"random"`: Gaussian inputs with the data's per-feature mean and spread and
    random labels, beside all of the data.
    """
    n = len(y)
    labels = class_labels(y, num_classes)
    if canary_type == "mislabel":
        chosen = rng.choice(n, size=m, replace=False)
        rest = np.setdiff1d(np.arange(n), chosen)
        canary_x = x[chosen]
        canary_labels = (labels[chosen] + rng.integers(1, num_classes, size=m)) % num_classes
        base_x, base_y = x[rest], y[rest]
    else:
        flat = x.reshape(n, -1).astype(np.float64)
        noise = rng.normal(size=(m, flat.shape[1])) * flat.std(axis=0) + flat.mean(axis=0)
        canary_x = noise.reshape((m,) + x.shape[1:]).astype(x.dtype)
        canary_labels = rng.integers(0, num_classes, size=m)
        base_x, base_y, rest = x, y, np.arange(n)
    return canary_x, _with_labels(y, canary_labels, num_classes), base_x, base_y, rest


def _dp_unit(model):
    """The `privacy_unit` of the keras_safe DP optimizer in the model's optimizer chain
    (following `inner_optimizer`), or None for a model that trains without one."""
    optimizer, seen = getattr(model, "optimizer", None), set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        unit = getattr(optimizer, "privacy_unit", None)
        if unit in ("example", "user"):
            return unit
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def _check_users(users, n):
    """`users` as a 1-D integer array of `n` ids, or an `ArgumentError` naming `users`."""
    ids = np.asarray(users)
    if ids.ndim != 1 or len(ids) != n or not np.issubdtype(ids.dtype, np.integer):
        fail(
            "users",
            Description(f"an array of shape {ids.shape} and dtype {ids.dtype}"),
            f"one integer user id per row of x ({n} ids)",
            "pass the id of the person each training example belongs to, for example "
            "np.unique(names, return_inverse=True)[1].",
        )
    return ids


def user_accountant_epsilon(model, delta):
    """The user-level epsilon a model's privacy ledger has spent, or None without a ledger.

    For user-level training (`privacy_unit="user"`) it is the ledger's epsilon. For
    example-level training given user ids (`fit(x, y, users=ids)` records the most examples one
    user has, k), it is the group-privacy epsilon of the ledger's segments for groups of k
    (Mironov 2017, "Renyi Differential Privacy", Prop. 2; the figure of the ledger's statement),
    plus k times the pure epsilon of statistics released with DP (group privacy of pure DP);
    infinite beyond the largest group that bound covers. Without user ids recorded it is the
    example-level epsilon, the user-level one when every user has one example.

    Args:
        model: a Keras model.
        delta: the delta of the guarantee, in (0, 1).

    Returns:
        The epsilon as a float, or None when the model has no privacy ledger.
    """
    ledger = get_ledger(model)
    if ledger is None:
        return None
    most = ledger.max_user_examples
    if ledger.privacy_unit == "user" or not most or most == 1 or not ledger.steps:
        return ledger.epsilon(delta)
    if most > MAX_GROUP_SIZE:
        return math.inf
    segments = [(s["noise_multiplier"], s["sampling_rate"], s["events"]) for s in ledger.segments()]
    return group_epsilon_of_segments(segments, most, delta) + most * ledger.statistics_epsilon


def _guessing_tests(scores, included, fractions, delta, confidence_level):
    """One hypothesis test per guessing plan: the top-scored canaries guessed IN (and, in the
    two-sided plans, the bottom-scored OUT), each with its epsilon lower bound at a share of
    the significance level (Bonferroni over the plans)."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    plans = []
    for fraction in fractions:
        k = max(1, int(round(fraction * m)))
        plans.append((int(math.ceil(k / 2)), k // 2))  # top IN, bottom OUT
        plans.append((k, 0))  # IN guesses only
    plans = list(dict.fromkeys(plans))
    significance = (1.0 - float(confidence_level)) / len(plans)
    tests = []
    for k_in, k_out in plans:
        guess_in, guess_out = order[:k_in], order[m - k_out :] if k_out else order[:0]
        correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
        guesses = k_in + k_out
        bound = guessing_epsilon_lower_bound(m, guesses, correct, delta, significance)
        tests.append(
            {
                "num_guesses": guesses,
                "guesses_in": k_in,
                "guesses_out": k_out,
                "num_correct": correct,
                "epsilon_lower_bound": bound,
            }
        )
    return tests


def canary_audit(
    model_factory,
    x,
    y,
    num_canaries=100,
    *,
    canary_type="mislabel",
    fit_kwargs=None,
    reference=True,
    guess_fractions=(0.05, 0.1, 0.2, 0.5, 1.0),
    delta=None,
    confidence_level=0.95,
    loss_fn=None,
    from_logits=None,
    batch_size=256,
    seed=0,
    users=None,
    examples_per_canary=1,
):
    """Empirical epsilon lower bound of a training recipe from inserted canaries.

    See the module docstring for the procedure (Steinke, Nasr & Jagielski 2023).

    Args:
        model_factory: zero-argument callable returning a new compiled classifier (for DP,
            with a keras_safe DP optimizer and `keras_safe.privacy.make_private` applied;
            leave the optimizer's `num_examples` out: each run trains on the data plus the
            included canaries, and keras_safe counts them).
        x: training inputs (numpy array).
        y: training labels, class indices or one-hot.
        num_canaries: number of canaries (>= 2), canary users with `users`. More canaries
            allow larger bounds.
        canary_type: `"mislabel"` (training examples with a random wrong label) or `"random"`
            (Gaussian inputs with the data's per-feature mean and spread, random labels).
        fit_kwargs: `model.fit` arguments of both training runs (default
            `{"epochs": 10, "batch_size": 32}`; for user-level DP, `batch_size` is the expected
            number of users per step).
        reference: also train a model without canaries and score canaries by the loss drop
            relative to it (calibrates per-canary difficulty); otherwise score by minus the loss.
            The loss is the training path's per-example loss (as in `membership_inference`).
        guess_fractions: numbers of guesses to try, as fractions of `num_canaries`; each
            fraction is tried guessing both ways (top IN, bottom OUT) and IN only.
        delta: delta of the bound (default: the DP optimizer's delta, else 1e-5).
        confidence_level: probability that the bound is valid.
        loss_fn: optional per-example loss overriding the compiled loss.
        from_logits: whether the model outputs logits (None: read from the loss or guess).
        batch_size: prediction batch size.
        seed: seed of the canary choice and inclusion.
        users: one integer user id per row of `x`, for a user-level audit: each canary is
            then a new user with `examples_per_canary` examples (for `"mislabel"`, that many
            training examples, each with a wrong label), included or left out with all of
            them, and the bound is user-level. A model with a keras_safe DP optimizer gets the
            ids of its training rows (`model.fit(..., users=ids)`), so that it samples, clips
            and accounts by user (`privacy_unit="user"`) or states the group-privacy epsilon
            (example-level training); a model without one trains on the same rows without
            them. Required when the DP optimizer has `privacy_unit="user"`.
        examples_per_canary: the examples of each canary user (>= 1; above 1 only with
            `users`).

    Returns:
        A `CanaryAuditResult`; with `users`, its `privacy_unit` is `"user"` and its
        `accountant_epsilon` the user-level epsilon (`user_accountant_epsilon`).

    Raises:
        ArgumentError: on a non-callable factory, malformed data, too few or too many
            canaries, an unknown `canary_type`, out-of-range fractions, delta or confidence
            level, malformed `users`, `examples_per_canary` above 1 without `users`, or
            `users` missing for a user-level DP model.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.audit import canary_audit
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(200, 8)).astype("float32"), rng.integers(0, 3, 200)
        >>> def make_model():
        ...     m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        ...     m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ...     return m
        >>> result = canary_audit(make_model, x, y, num_canaries=20, fit_kwargs={"epochs": 1})
        >>> result.epsilon_lower_bound >= 0
        True
        >>> ids = np.arange(200) // 4  # 50 users of 4 examples
        >>> result = canary_audit(
        ...     make_model, x, y, num_canaries=10, fit_kwargs={"epochs": 1},
        ...     users=ids, examples_per_canary=3,
        ... )
        >>> result.privacy_unit, result.num_canaries
        ('user', 10)
    """
    check_model_factory(model_factory, "the canary audit's training runs")
    x, y, _ = check_examples("x, y", (x, y), allow_weights=False)
    x = np.asarray(x)
    n = len(y)
    per_canary = check_number(
        "examples_per_canary",
        examples_per_canary,
        low=1,
        integer=True,
        fix="pass the number of examples of each canary user (1 for example-level canaries).",
    )
    if users is None and per_canary > 1:
        fail(
            "users",
            None,
            f"one user id per row of x when examples_per_canary={per_canary} (a canary "
            "with several examples is a canary user, audited at the user level)",
            "pass users=ids for a user-level audit, or leave examples_per_canary at 1.",
        )
    ids = None if users is None else _check_users(users, n)
    canary_type = check_choice("canary_type", canary_type, ("mislabel", "random"))
    limit = (n - 1) // per_canary if canary_type == "mislabel" else 10**9
    m = check_number(
        "num_canaries",
        num_canaries,
        low=2,
        high=limit,
        integer=True,
        fix=(
            f"pass between 2 and {min(limit, n - 1)} canaries (the data has {n} examples"
            + (f", {per_canary} per canary user)." if per_canary > 1 else ").")
        ),
    )
    fractions = _check_fractions(guess_fractions)
    confidence_level = check_probability("confidence_level", confidence_level)
    if delta is not None:
        delta = check_number("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    num_classes = _num_classes(y)
    if num_classes < 2:
        fail(
            "y",
            Description(f"labels of {num_classes} class(es)"),
            "labels of at least two classes, so that a canary can get a wrong label",
            "pass a classification data set.",
        )
    fit_kwargs = dict(DEFAULT_FIT_KWARGS if fit_kwargs is None else fit_kwargs)
    if "users" in fit_kwargs:
        fail(
            "fit_kwargs",
            Description("a dict with 'users'"),
            "the fit arguments without user ids (the audit gives each run its rows' ids)",
            "pass the ids as canary_audit(..., users=ids).",
        )
    fit_kwargs.setdefault("verbose", 0)
    rng = np.random.default_rng(seed)

    canary_x, canary_y, base_x, base_y, rest = _make_canaries(
        rng, x, y, m * per_canary, num_classes, canary_type
    )
    included = rng.random(m) < 0.5
    if ids is not None:
        # Canary user j owns canary rows j * per_canary ... (j + 1) * per_canary - 1.
        first = max(int(ids.max()) + 1, 0)
        canary_ids = first + np.repeat(np.arange(m, dtype=np.int64), per_canary)
        base_ids = ids[rest].astype(np.int64)
    rows_in = np.repeat(included, per_canary)

    def train(train_x, train_y, train_ids=None):
        model = compiled_model(model_factory)
        unit = _dp_unit(model)
        if unit == "user" and train_ids is None:
            fail(
                "users",
                None,
                "one user id per row of x: the model's DP optimizer has privacy_unit='user'",
                "pass canary_audit(..., users=ids, examples_per_canary=k).",
            )
        order = rng.permutation(len(train_y))
        extra = {} if train_ids is None or unit is None else {"users": train_ids[order]}
        model.fit(train_x[order], train_y[order], **extra, **fit_kwargs)
        return model

    audited = train(
        np.concatenate([base_x, canary_x[rows_in]]),
        np.concatenate([base_y, canary_y[rows_in]]),
        None if ids is None else np.concatenate([base_ids, canary_ids[rows_in]]),
    )
    common = dict(loss_fn=loss_fn, from_logits=from_logits, batch_size=batch_size)
    loss = example_losses(audited, canary_x, canary_y, **common)
    if reference:
        ref_model = train(base_x, base_y, None if ids is None else base_ids)
        scores = example_losses(ref_model, canary_x, canary_y, **common) - loss
    else:
        scores = -loss
    if per_canary > 1:
        scores = np.asarray(scores).reshape(m, per_canary).mean(axis=1)
    if delta is None:
        delta = audit_delta(audited)

    tests = _guessing_tests(scores, included, fractions, delta, confidence_level)
    best = max(t["epsilon_lower_bound"] for t in tests)
    if included.all() or not included.any():
        auc = 0.5
    else:
        auc = attack_metrics(scores[included], scores[~included], delta=delta)["auc"]
    return CanaryAuditResult(
        epsilon_lower_bound=best,
        accountant_epsilon=(
            accountant_epsilon(audited, delta)
            if ids is None
            else user_accountant_epsilon(audited, delta)
        ),
        delta=delta,
        confidence_level=confidence_level,
        scores=scores,
        included=included,
        tests=tests,
        auc=auc,
        privacy_unit="example" if ids is None else "user",
        examples_per_canary=per_canary,
    )
