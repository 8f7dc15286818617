"""Argument checks shared by every keras_safe class and function.

One exception type, `ArgumentError` (a `ValueError`), and one message template:

    `{name}` must be {requirement}, got {value!r}. Fix: {fix}

so every wrong hyper-parameter names the argument, what it must be, what was given and how to
fix it, whichever module raises it.
"""

import math
import numbers

__all__ = [
    "ArgumentError",
    "PrivacyError",
    "STEP_REFUSED",
    "check_choice",
    "check_number",
    "check_probability",
    "fail",
    "step_refusal",
]


class ArgumentError(ValueError):
    """A wrong argument: the message names the argument, the requirement and the fix."""

    # TensorFlow's autograph re-raises an error from a `tf.function` as the same type only
    # when its constructor is `Exception.__init__` (otherwise as a StagingError).
    __init__ = Exception.__init__


class PrivacyError(RuntimeError):
    """keras_safe cannot prove a step private, so it refuses to take it (it fails closed).

    The message says what could not be proven and how to fix it. Nothing was trained: the
    weights, the optimizer and the privacy ledger are as they were before the call.
    """

    __init__ = Exception.__init__  # re-raised as this type from a tf.function (see above)


# Every check that runs inside a traced step (and so can only stop it with a TensorFlow error)
# starts its message with this, so the entry points can raise it as a `PrivacyError`.
STEP_REFUSED = "keras_safe refused this step: "


def step_refusal(error):
    """The `PrivacyError` for a TensorFlow error raised by a keras_safe check inside a step,
    or None for any other error."""
    message = getattr(error, "message", None) or str(error)
    start = message.find(STEP_REFUSED)
    if start < 0:
        return None
    return PrivacyError(message[start:].split("\n\t ")[0].strip())


def fail(name, value, requirement, fix=None):
    """Raises `ArgumentError` with the one message template.

    Args:
        name: the argument's name as the user wrote it.
        value: the value received.
        requirement: what the argument must be, completing "`name` must be ...".
        fix: how to fix it; None to leave the "Fix:" part out.

    Raises:
        ArgumentError: always.

    Example:
        >>> try:
        ...     fail("epochs", -1, "a positive number", "pass the passes over the data.")
        ... except ArgumentError as error:
        ...     print(error)
        `epochs` must be a positive number, got -1. Fix: pass the passes over the data.
    """
    message = f"`{name}` must be {requirement}, got {value!r}."
    if fix:
        message += f" Fix: {fix}"
    raise ArgumentError(message)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    name,
    value,
    *,
    low=None,
    high=None,
    low_inclusive=True,
    high_inclusive=True,
    integer=False,
    allow_none=False,
    fix=None,
):
    """Checks a finite number (optionally whole, optionally bounded) and returns it.

    Args:
        name: the argument's name.
        value: the value to check.
        low: lower bound, or None.
        high: upper bound, or None.
        low_inclusive: whether `low` itself is allowed.
        high_inclusive: whether `high` itself is allowed.
        integer: require a whole number (returned as `int`).
        allow_none: return None for None instead of failing.
        fix: the fix to suggest; a default naming the range is used when None.

    Returns:
        `value` as an `int` (with `integer=True`) or a `float`, or None.

    Raises:
        ArgumentError: when the value is missing, not a number, not finite, not whole when it
            must be, or out of range.

    Example:
        >>> check_number("batch_size", 64.0, low=1, integer=True)
        64
    """
    kind = "a whole number" if integer else "a number"
    parts = []
    if low is not None:
        parts.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if high_inclusive else '<'} {high:g}")
    requirement = kind + (" " + " and ".join(parts) if parts else "")
    if value is None:
        if allow_none:
            return None
        fail(name, value, requirement, fix or f"pass {requirement}.")
    ok = _is_real(value) and math.isfinite(float(value))
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        fail(name, value, "finite and " + requirement, fix or f"pass {requirement}.")
    return int(value) if integer else float(value)


def check_probability(
    name, value, *, allow_zero=False, allow_one=False, allow_none=False, fix=None
):
    """Checks a probability in (0, 1) (ends allowed on request) and returns it as a float.

    Example:
        >>> check_probability("delta", 1e-5)
        1e-05
    """
    return check_number(
        name,
        value,
        low=0.0,
        high=1.0,
        low_inclusive=allow_zero,
        high_inclusive=allow_one,
        allow_none=allow_none,
        fix=fix,
    )


def check_choice(name, value, choices, fix=None):
    """Checks that `value` is one of `choices` and returns it.

    Example:
        >>> check_choice("accountant", "rdp", ("rdp", "pld"))
        'rdp'
    """
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        fail(name, value, f"one of {listed}", fix or f"use one of {listed}.")
    return value
