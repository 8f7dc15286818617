"""Accountants behind a small registry, and the DP-SGD event they compose.

An accountant turns a sequence of DP-SGD *segments* (noise multiplier, sampling rate, number of
steps) into an `(epsilon, delta)` guarantee. Segments with different noise or sampling rates
compose (`dp_accounting` composes heterogeneous events), which is what the privacy ledger needs.

- `"rdp"`: Renyi-DP accounting (Mironov 2017; Mironov, Talwar and Zhang 2019, "Renyi
  Differential Privacy of the Sampled Gaussian Mechanism"), converted to `(epsilon, delta)` with
  the conversion of Canonne, Kamath and Steinke 2020 that `dp_accounting` uses, over the orders
  `RDP_ORDERS`.
- `"pld"`: privacy-loss-distribution accounting (Koskela et al. 2020; Doroshenko et al. 2022,
  "Connect the Dots"): numerically tight and pessimistic, never above the RDP figure, slower.

The built-in accountants are `DEFAULT_ACCOUNTANTS`; a new one (PRV, for example) is one
`register_accountant(name, factory)` call, where `factory()` returns a fresh
`dp_accounting.PrivacyAccountant` (the registry shape of `keras_safe._registry`:
`unregister_accountant`, `get_accountant`, `accountant_names`; a name taken is refused unless
`replace=True`).
"""

import contextlib
import logging

import dp_accounting

from keras_safe._registry import Registry
from keras_safe._validation import check_choice, fail

__all__ = [
    "DEFAULT_ACCOUNTANTS",
    "RDP_ORDERS",
    "accountant_names",
    "calibrate_noise",
    "check_accountant",
    "dp_sgd_event",
    "epsilon_of",
    "get_accountant",
    "make_accountant",
    "register_accountant",
    "unregister_accountant",
]

RDP_ORDERS = tuple(
    [round(1.0 + i / 10.0, 1) for i in range(1, 101)]
    + [float(order) for order in range(12, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)
"""The Renyi-DP orders the `"rdp"` accountant optimises epsilon over (156 orders: 1.1 to 11.0 in
steps of 0.1, the integers 12 to 63, and 128, 256, 512, 1024)."""

# Noise multipliers above this are not useful for training; a target that needs more is
# reported as unreachable.
MAX_NOISE_MULTIPLIER = 1000.0


def _rdp():
    return dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))


DEFAULT_ACCOUNTANTS = (("rdp", _rdp), ("pld", dp_accounting.pld.PLDAccountant))
"""The built-in accountants, `(name, factory)`: Renyi DP over `RDP_ORDERS`, and privacy loss
distributions."""

_ACCOUNTANTS = Registry(
    "accountant",
    DEFAULT_ACCOUNTANTS,
    name_of=lambda entry: entry[0],
    register_call="keras_safe.accounting.register_accountant",
    normalize=lambda name: name.lower(),
)


def register_accountant(name, factory, *, replace=False):
    """Registers an accountant under `name` (case-insensitive); `factory()` returns a fresh
    `dp_accounting.PrivacyAccountant`.

    Args:
        name: the accountant's name, as `accountant=` arguments will give it.
        factory: a callable returning a new `dp_accounting.PrivacyAccountant`.
        replace: replace an accountant registered under `name` (a built-in one included) on
            purpose; without it a name taken is refused.

    Raises:
        keras_safe._validation.ArgumentError: an empty name, a factory that is not callable,
            or a name taken (without `replace`).

    Example:
        >>> import dp_accounting
        >>> register_accountant("rdp_integer_orders",
        ...                     lambda: dp_accounting.rdp.RdpAccountant(list(range(2, 64))))
        >>> accountant_names()
        ('rdp', 'pld', 'rdp_integer_orders')
        >>> unregister_accountant("rdp_integer_orders")
    """
    if not isinstance(name, str) or not name:
        fail("name", name, "a non-empty string", "name the accountant, for example 'prv'.")
    if not callable(factory):
        fail("factory", factory, "a callable returning a dp_accounting.PrivacyAccountant")
    _ACCOUNTANTS.register((name.lower(), factory), replace=replace)


def unregister_accountant(name):
    """Removes the accountant registered under `name` (built-in ones cannot be removed).

    Raises:
        keras_safe._validation.ArgumentError: no accountant was registered under `name`.
    """
    _ACCOUNTANTS.unregister(name)


def get_accountant(name):
    """The factory of the accountant registered under `name` (case-insensitive).

    Raises:
        keras_safe._validation.ArgumentError: an unknown name.

    Example:
        >>> type(get_accountant("PLD")()).__name__
        'PLDAccountant'
    """
    return _ACCOUNTANTS.get(name, "accountant")[1]


def accountant_names():
    """The names of the accountants: the built-in ones, then the registered ones."""
    return _ACCOUNTANTS.names()


def check_accountant(accountant):
    """Checks an accountant name (case-insensitive) and returns it in lower case."""
    name = accountant.lower() if isinstance(accountant, str) else accountant
    return check_choice(
        "accountant",
        name,
        accountant_names(),
        "use 'rdp' (Renyi DP, the usual figure) or 'pld' (privacy loss distributions, tighter).",
    )


def make_accountant(accountant):
    """A fresh `dp_accounting` accountant of the registered kind."""
    return get_accountant(check_accountant(accountant))()


def dp_sgd_event(noise_multiplier, sampling_rate, steps):
    """`steps` compositions of a Poisson-subsampled Gaussian mechanism."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        gaussian = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(gaussian, int(steps))


class _SkipOrderNotices(logging.Filter):
    """Drops `dp_accounting`'s notice that a fractional RDP order did not converge.

    For large sampling rates the series for the smallest orders may not converge; the
    accountant then leaves that order out of the minimum, which can only raise epsilon (a safe
    figure), and logs a warning on every call. The notice is not actionable.
    """

    def filter(self, record):
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def quiet_order_notices():
    """Silences `dp_accounting`'s non-convergence notices of fractional RDP orders."""
    logger = logging.getLogger("absl")
    quiet = _SkipOrderNotices()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def epsilon_of(segments, delta, accountant="rdp"):
    """Epsilon of the composition of DP-SGD segments `(noise_multiplier, sampling_rate, steps)`.

    Segments with no steps are skipped; any segment with steps and zero noise makes epsilon
    infinite. Inputs are not validated here (callers validate).

    Example:
        >>> round(epsilon_of([(1.5, 0.04, 2250)], 1e-5), 3)
        7.329
        >>> a = epsilon_of([(1.1, 0.01, 500), (0.9, 0.02, 300)], 1e-5)
        >>> epsilon_of([(1.1, 0.01, 500)], 1e-5) < a
        True
    """
    segments = [(float(s), float(q), int(n)) for s, q, n in segments if int(n) > 0]
    if not segments:
        return 0.0
    if any(s == 0.0 for s, _, _ in segments):
        return float("inf")
    acc = make_accountant(accountant)
    with quiet_order_notices():
        for noise, rate, steps in segments:
            acc.compose(dp_sgd_event(noise, rate, steps))
        return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon, sampling_rate, steps, delta, accountant, prior=(), upper=None):
    """Smallest noise multiplier (within 1e-6) whose epsilon is at most `target_epsilon`.

    `prior` segments are composed before the `steps` new ones (for example what a model's
    ledger already spent); the search only sets the noise of the new steps.

    Raises:
        ArgumentError: when even noise 1000 misses the target (naming `target_epsilon`).
    """
    if steps == 0:
        return 0.0
    prior = list(prior)

    def epsilon(noise):
        return epsilon_of([*prior, (noise, sampling_rate, steps)], delta, accountant)

    hi = upper if upper is not None else 1.0
    while epsilon(hi) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            fail(
                "target_epsilon",
                target_epsilon,
                "reachable (it is unreachable: even noise_multiplier="
                f"{MAX_NOISE_MULTIPLIER:g} gives epsilon {epsilon(hi):.4g} for {steps} steps at "
                f"sampling rate {sampling_rate:.4g} and delta={delta:.3g})",
                "raise target_epsilon, train fewer steps or epochs, use a smaller batch, or a "
                "larger delta.",
            )
        hi = min(2.0 * hi, MAX_NOISE_MULTIPLIER)
    # Shrink the lower end gently from a good upper bound: PLD accounting gets expensive at
    # small noise multipliers, so the search should not wander far below.
    shrink = 0.5 if upper is None else 0.85
    lo = hi * shrink
    while epsilon(lo) <= target_epsilon:
        hi, lo = lo, lo * shrink
        if lo < 1e-3:
            return hi

    def make_event(noise):
        events = [dp_sgd_event(s, q, n) for s, q, n in prior if n > 0]
        return dp_accounting.ComposedDpEvent([*events, dp_sgd_event(noise, sampling_rate, steps)])

    with quiet_order_notices():
        root = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
            tol=1e-6,
        )
    return float(root)
