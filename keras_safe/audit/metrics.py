"""Metrics of a membership inference attack: ROC AUC, advantage, TPR at low FPR, epsilon bounds.

Every function here takes attack *scores*: one number per example, larger meaning "more likely a
member". The ROC curve comes from scikit-learn's `roc_curve` / `roc_auc_score`.

The empirical epsilon lower bound follows Jagielski et al. 2020 ("Auditing Differentially Private
Machine Learning: How Private is Private SGD?") and Nasr et al. 2021 ("Adversary Instantiation:
Lower Bounds for Differentially Private Machine Learning"): an (epsilon, delta)-DP training
algorithm forces every membership test with false positive rate FPR and false negative rate FNR
to satisfy `FPR + exp(epsilon) * FNR >= 1 - delta` and `FNR + exp(epsilon) * FPR >= 1 - delta`, so

    epsilon >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)).

The rates are replaced by Clopper-Pearson confidence bounds (Clopper & Pearson 1934). Picking the
best threshold on the same scores makes the result a diagnostic rather than a proof;
`keras_safe.audit.canary_audit` gives a valid bound (Steinke, Nasr & Jagielski 2023).
"""

import math

import numpy as np

from keras_safe._data import Description
from keras_safe._validation import check_number, check_probability, fail

__all__ = [
    "LOW_FPRS",
    "METRIC_NAMES",
    "attack_metrics",
    "clopper_pearson",
    "epsilon_lower_bound",
    "guessing_epsilon_lower_bound",
    "roc_points",
    "tpr_at_fpr",
]

#: The low false positive rates at which the true positive rate is reported (Carlini et al. 2022).
LOW_FPRS = (0.001, 0.01)

#: Metric names of one attack evaluation, in table order.
METRIC_NAMES = (
    "auc",
    "advantage",
    "tpr_at_0.1%_fpr",
    "tpr_at_1%_fpr",
    "epsilon_lower_bound",
    "epsilon_estimate",
    "epsilon_ci_high",
)


def _as_scores(name, scores):
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.size == 0:
        fail(name, Description("no score"), "non-empty", "pass at least one attack score.")
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array)))
        fail(
            name,
            Description(f"{bad} non-finite score(s) (NaN or inf)"),
            "finite scores",
            "check the model outputs and the loss; an attack score must be a finite number.",
        )
    return array


def _check_level(confidence_level):
    return check_probability(
        "confidence_level", confidence_level, fix="pass for example confidence_level=0.95."
    )


def _check_delta(delta):
    return check_number(
        "delta",
        delta,
        low=0.0,
        high=1.0,
        high_inclusive=False,
        fix="pass the delta of the DP guarantee you want to test, for example delta=1e-5.",
    )


def clopper_pearson(successes, trials, confidence_level=0.95):
    """Two-sided Clopper-Pearson confidence interval of a binomial proportion.

    Args:
        successes: number (or array of numbers) of successes.
        trials: number (or array of numbers) of trials, positive.
        confidence_level: probability that the interval covers the true proportion.

    Returns:
        A pair `(low, high)` of floats or arrays (the shape of the broadcast inputs).

    Raises:
        ArgumentError: if `trials` is not positive, `successes` lies outside `[0, trials]`, or
            `confidence_level` is not in (0, 1).

    Example:
        >>> low, high = clopper_pearson(0, 100, 0.95)
        >>> round(float(low), 3), round(float(high), 4)
        (0.0, 0.0362)
    """
    from scipy.stats import beta

    _check_level(confidence_level)
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n <= 0):
        fail("trials", trials, "positive", "pass the number of trials (>= 1).")
    if np.any(k < 0) or np.any(k > n):
        fail("successes", successes, "between 0 and `trials`", "count the successes again.")
    alpha = 1.0 - float(confidence_level)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        high = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _epsilon_from_rates(fpr, fnr, delta):
    """Largest epsilon the pair of error rates certifies, per threshold (inf where a rate is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(
            1.0 - delta - fnr > 0, np.log(np.maximum(1.0 - delta - fnr, 0) / fpr), -np.inf
        )
        second = np.where(
            1.0 - delta - fpr > 0, np.log(np.maximum(1.0 - delta - fpr, 0) / fnr), -np.inf
        )
    values = np.maximum(first, second)
    values = np.where(np.isnan(values), -np.inf, values)
    return max(0.0, float(np.max(values))) if values.size else 0.0


def roc_points(member_scores, non_member_scores):
    """ROC curve of a score-threshold attack ("member if score >= threshold").

    Args:
        member_scores: scores of the training examples (positives).
        non_member_scores: scores of the held-out examples (negatives).

    Returns:
        A tuple `(fpr, tpr, thresholds)` of numpy arrays from scikit-learn's `roc_curve`, with
        every threshold kept (`drop_intermediate=False`).

    Raises:
        ArgumentError: if a score list is empty or holds a non-finite value.

    Example:
        >>> fpr, tpr, _ = roc_points([3.0, 2.0], [1.0, 0.0])
        >>> float(tpr[fpr == 0].max())
        1.0
    """
    from sklearn.metrics import roc_curve

    members = _as_scores("member_scores", member_scores)
    non_members = _as_scores("non_member_scores", non_member_scores)
    labels = np.concatenate([np.ones(members.size), np.zeros(non_members.size)])
    scores = np.concatenate([members, non_members])
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr, thresholds


def tpr_at_fpr(fpr, tpr, target_fpr):
    """Largest true positive rate among ROC points whose false positive rate is <= `target_fpr`.

    Args:
        fpr: false positive rates of the ROC points (increasing).
        tpr: true positive rates of the same points.
        target_fpr: the largest false positive rate allowed, in [0, 1].

    Returns:
        The true positive rate as a float (0.0 when only the empty test qualifies).

    Example:
        >>> tpr_at_fpr([0.0, 0.5, 1.0], [0.25, 0.75, 1.0], 0.5)
        0.75
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    allowed = fpr <= float(target_fpr) + 1e-12
    return float(np.max(tpr[allowed])) if np.any(allowed) else 0.0


def epsilon_lower_bound(
    member_scores, non_member_scores, delta=1e-5, confidence_level=0.95, return_interval=False
):
    """Empirical epsilon lower bound of a threshold attack with Clopper-Pearson confidence.

    For every threshold of the ROC curve, the false positive and false negative counts give
    Clopper-Pearson intervals of FPR and FNR; their upper ends give the bound (Jagielski et al.
    2020), the observed rates give the point estimate, and the lower ends give the upper end of
    the interval. The best threshold is taken on the same scores, and the members and
    non-members of one trained model are not independent trials of the training algorithm, so
    this is a diagnostic, not a proof: with a correct epsilon=1 mechanism it exceeded 1 in about
    10% of trials at 95% confidence (not 5%). `canary_audit` gives a statistically valid bound.

    Args:
        member_scores: scores of the training examples (larger = more likely a member).
        non_member_scores: scores of the held-out examples.
        delta: the delta of the (epsilon, delta)-DP guarantee under test, in [0, 1).
        confidence_level: confidence of the Clopper-Pearson intervals, in (0, 1).
        return_interval: when True, also return the point estimate and the upper end.

    Returns:
        The lower bound (a float >= 0); with `return_interval=True` a tuple
        `(lower_bound, estimate, upper)` where `estimate` and `upper` may be `inf`
        (an attack without false positives or false negatives certifies no finite epsilon).

    Raises:
        ArgumentError: on empty or non-finite scores, or `delta` / `confidence_level` out of range.

    Example:
        >>> import numpy as np
        >>> lb = epsilon_lower_bound(np.arange(100.0) + 100, np.arange(100.0), delta=0.0)
        >>> 2.5 < lb < 3.5
        True
    """
    _check_delta(delta)
    _check_level(confidence_level)
    fpr, tpr, _ = roc_points(member_scores, non_member_scores)
    n_pos = np.asarray(member_scores).size
    n_neg = np.asarray(non_member_scores).size
    false_pos = np.rint(fpr * n_neg)
    false_neg = n_pos - np.rint(tpr * n_pos)
    fpr_low, fpr_high = clopper_pearson(false_pos, n_neg, confidence_level)
    fnr_low, fnr_high = clopper_pearson(false_neg, n_pos, confidence_level)
    delta = float(delta)
    lower = _epsilon_from_rates(fpr_high, fnr_high, delta)
    if not return_interval:
        return lower
    estimate = _epsilon_from_rates(false_pos / n_neg, false_neg / n_pos, delta)
    upper = _epsilon_from_rates(fpr_low, fnr_low, delta)
    return lower, estimate, upper


def attack_metrics(member_scores, non_member_scores, delta=1e-5, confidence_level=0.95):
    """All headline metrics of one threshold attack.

    Args:
        member_scores: scores of the training examples (larger = more likely a member).
        non_member_scores: scores of the held-out examples.
        delta: the delta used by the epsilon bounds.
        confidence_level: confidence of the Clopper-Pearson intervals of the epsilon bounds.

    Returns:
        A dict with `n_members`, `n_non_members`, `auc` (ROC AUC, scikit-learn),
        `advantage` (max over thresholds of TPR - FPR, Yeom et al. 2018), `tpr_at_0.1%_fpr`,
        `tpr_at_1%_fpr` (Carlini et al. 2022), `epsilon_lower_bound` (a diagnostic, see
        `epsilon_lower_bound`; `canary_audit` gives a valid bound), `epsilon_estimate`
        (from the observed rates) and `epsilon_ci_high`.

    Raises:
        ArgumentError: on empty or non-finite scores or out-of-range `delta` / `confidence_level`.

    Example:
        >>> m = attack_metrics([0.9, 0.8, 0.7], [0.6, 0.5, 0.4], delta=0.0)
        >>> m["auc"], m["advantage"]
        (1.0, 1.0)
    """
    from sklearn.metrics import roc_auc_score

    members = _as_scores("member_scores", member_scores)
    non_members = _as_scores("non_member_scores", non_member_scores)
    fpr, tpr, _ = roc_points(members, non_members)
    labels = np.concatenate([np.ones(members.size), np.zeros(non_members.size)])
    auc = float(roc_auc_score(labels, np.concatenate([members, non_members])))
    lower, estimate, upper = epsilon_lower_bound(
        members, non_members, delta=delta, confidence_level=confidence_level, return_interval=True
    )
    return {
        "n_members": int(members.size),
        "n_non_members": int(non_members.size),
        "auc": auc,
        "advantage": float(max(0.0, np.max(tpr - fpr))),
        "tpr_at_0.1%_fpr": tpr_at_fpr(fpr, tpr, LOW_FPRS[0]),
        "tpr_at_1%_fpr": tpr_at_fpr(fpr, tpr, LOW_FPRS[1]),
        "epsilon_lower_bound": lower,
        "epsilon_estimate": estimate,
        "epsilon_ci_high": upper,
    }


def _guess_p_value(m, r, v, epsilon, delta):
    """P-value of `v` correct guesses out of `r` under (epsilon, delta)-DP (Steinke et al. 2023)."""
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    # delta term of Theorem 3.3: 2 m delta max_i P[v - i <= Binomial(r, q) < v] / i.
    i = np.arange(1, v + 1)
    window = np.cumsum(binom.pmf(v - i, r, q))
    return min(tail + 2.0 * m * delta * float(np.max(window / i)), 1.0)


def guessing_epsilon_lower_bound(
    num_canaries, num_guesses, num_correct, delta=0.0, significance=0.05
):
    """Epsilon lower bound from guessing the membership of independently included canaries.

    Implements the hypothesis test of Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One
    (1) Training Run"): each of `num_canaries` canaries was included in training independently
    with probability 1/2; an auditor made `num_guesses` guesses (abstaining on the rest) of which
    `num_correct` were right. Under (epsilon, delta)-DP the number of correct guesses is dominated
    by Binomial(num_guesses, e^epsilon / (1 + e^epsilon)) plus a delta term. The returned value is
    the largest epsilon that this test rejects at the given significance.

    Args:
        num_canaries: number of canaries `m` (each included with probability 1/2).
        num_guesses: number of guesses `r`, 0 <= r <= m.
        num_correct: number of correct guesses `v`, 0 <= v <= r.
        delta: the delta of the guarantee under test, in [0, 1).
        significance: probability of a wrong claim (1 - confidence), in (0, 1).

    Returns:
        The epsilon lower bound (float >= 0).

    Raises:
        ArgumentError: if the counts are inconsistent or `delta` / `significance` is out of range.

    Example:
        >>> round(guessing_epsilon_lower_bound(1000, 100, 100), 2)
        3.49
    """
    from scipy.optimize import brentq

    _check_delta(delta)
    check_probability("significance", significance, fix="pass e.g. significance=0.05.")
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if not 0 <= v <= r <= m:
        fail(
            "num_correct",
            Description(f"num_correct={v}, num_guesses={r}, num_canaries={m}"),
            "at most num_guesses, itself at most num_canaries (0 <= num_correct <= num_guesses "
            "<= num_canaries)",
            "pass the counts of one guessing game.",
        )
    delta, significance = float(delta), float(significance)
    if r == 0 or _guess_p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0

    def gap(eps):
        return _guess_p_value(m, r, v, eps, delta) - significance

    high = 1.0
    while gap(high) < 0:
        high *= 2.0
        if high > 1e3:
            return float("inf")
    return float(brentq(gap, 0.0, high, xtol=1e-6))
