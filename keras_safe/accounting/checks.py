"""The accounting's argument checks, and the one rule for the default delta.

Every delta keras_safe accepts (DP optimizers, `PrivacyBudget`, `compute_epsilon`,
`privacy_statement`, a ledger's epsilon and budget) goes through `check_delta`, which refuses
`delta >= 1 / num_examples` wherever the number of examples is known: a mechanism that publishes
one random example in full is `(0, 1/n)`-DP, so such a delta allows exactly that. Every default
delta comes from `default_delta`.
"""

from keras_safe._validation import check_number, check_probability, fail

__all__ = [
    "check_delta",
    "check_noise",
    "check_target",
    "default_delta",
    "resolve_delta",
]


def _whole(name, value, fix):
    return check_number(name, value, low=1, integer=True, fix=fix)


def default_delta(num_examples):
    """Returns the default delta for a training set of `num_examples` examples: `1 / n**1.1`.

    Delta is the probability with which the epsilon guarantee may fail outright. A mechanism
    that publishes one random example in full is `(0, 1/n)`-DP, so a meaningful delta must be
    well below `1/n`. `n**-1.1` is polynomially smaller than `1/n` and stays usable for small
    data sets (1.5e-4 for 3,000 examples, 5.5e-6 for 60,000, 2.5e-7 for a million). This is the
    only default-delta rule in keras_safe.

    Args:
        num_examples: the number of training examples, a positive integer.

    Returns:
        The delta as a float.

    Raises:
        ArgumentError: if `num_examples` is not a positive integer.

    Example:
        >>> from keras_safe.accounting import default_delta
        >>> round(default_delta(60000), 8)
        5.55e-06
    """
    n = _whole("num_examples", num_examples, "pass the number of training examples.")
    return 1.0 / n**1.1


def check_delta(delta, num_examples=None, name="delta"):
    """Checks a delta in (0, 1), below `1 / num_examples` when that is known; returns it.

    Raises:
        ArgumentError: naming `name`, with `default_delta(num_examples)` as the fix.

    Example:
        >>> check_delta(1e-5, num_examples=1000)
        1e-05
        >>> try:
        ...     check_delta(0.01, num_examples=1000)
        ... except ValueError as error:
        ...     print(str(error).split(" (")[0])
        `delta` must be below 1/num_examples = 0.001
    """
    fix = "pass a small probability well below 1/num_examples, for example "
    if num_examples is None:
        fix += "keras_safe.accounting.default_delta(num_examples)."
    else:
        fix += f"default_delta({int(num_examples)}) = {default_delta(num_examples):.3g}."
    delta = check_probability(name, delta, fix=fix)
    if num_examples is not None and delta >= 1.0 / num_examples:
        fail(
            name,
            delta,
            f"below 1/num_examples = {1.0 / num_examples:.3g} (a delta of 1/n or more allows "
            "publishing one training example in full)",
            fix,
        )
    return delta


def resolve_delta(delta, num_examples):
    """`delta` checked (below `1/num_examples` when known), or `default_delta(num_examples)`
    when it is None."""
    if delta is None:
        if num_examples is None:
            fail(
                "delta",
                delta,
                "given when `num_examples` is not",
                "pass `delta`, or `num_examples` to use default_delta(num_examples).",
            )
        return default_delta(num_examples)
    return check_delta(delta, num_examples)


def check_noise(noise_multiplier):
    """Checks a noise multiplier (finite, >= 0) and returns it as a float."""
    return check_number(
        "noise_multiplier",
        noise_multiplier,
        low=0.0,
        fix="pass the ratio of the noise standard deviation to the clipping norm, for example "
        "1.1 (0 means no noise and an infinite epsilon), or calibrate it with "
        "noise_multiplier_for_epsilon(...).",
    )


def check_target(target_epsilon):
    """Checks a target epsilon (finite, > 0) and returns it as a float."""
    return check_number(
        "target_epsilon",
        target_epsilon,
        low=0.0,
        low_inclusive=False,
        fix="pass the privacy budget you want to meet, for example 3.0.",
    )
