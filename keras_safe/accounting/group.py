"""User-level epsilon: the guarantee for a person with several examples, from the RDP curve.

DP-SGD's epsilon is example-level: it protects the presence of any one example (add-or-remove
adjacency). A person who contributed `k` examples differs from a data set without them by `k`
additions or removals, so their protection is group privacy for groups of `k`.

The group figure here comes from the Renyi-DP curve of the training run, by Mironov 2017
("Renyi Differential Privacy", Prop. 2, group privacy): if a mechanism is `(a, eps(a))`-RDP for
data sets at distance 1 and `a >= 2**(c + 1)`, then for data sets at distance at most `2**c` it
is `(a / 2**c, 3**c * eps(a))`-RDP. Written per group order `b = a / 2**c`: a group of
`k <= 2**c` examples is `(b, 3**c * eps(2**c * b))`-RDP for every order `b >= 2`, with
`c = ceil(log2(k))`. The curve `eps` is `dp_accounting`'s RDP of the composed Poisson-subsampled
Gaussian steps (Mironov, Talwar and Zhang 2019), evaluated at the orders `2**c * b`; the group
curve is then converted to `(epsilon, delta)` by the conversion `dp_accounting` uses for every
RDP figure (Canonne, Kamath and Steinke 2020, Prop. 12), `dp_accounting.rdp.compute_epsilon`.
For `k = 1` nothing changes (`c = 0`, every order is kept), so the figure is exactly the
ordinary RDP epsilon.

The bound grows as `3**c` times an RDP value taken at an order `2**c` times larger, so it is
useful for small groups and strong noise only. It is still a guarantee at the stated delta,
unlike `k * epsilon`: the group property of `(epsilon, delta)`-DP gives `k * epsilon` only with
delta multiplied by `k * exp((k - 1) * epsilon)` (Vadhan 2017, "The Complexity of Differential
Privacy", Sec. 2), which is vacuous for moderate `k`.
"""

import dp_accounting

from keras_safe._validation import check_number, check_probability, fail
from keras_safe.accounting.accountants import RDP_ORDERS, dp_sgd_event, quiet_order_notices

__all__ = ["MAX_GROUP_SIZE", "group_epsilon", "group_epsilon_of_segments"]

MAX_GROUP_SIZE = 1024
"""The largest `group_size` accepted: beyond it the RDP orders needed (`2**c` times the group
orders, over a million for 1024) take seconds to evaluate, and the figure, growing as
`3**ceil(log2(k))`, is far from any useful guarantee."""

_GROUP_FIX = (
    "pass the number of examples one person may contribute, from 1 to "
    f"{MAX_GROUP_SIZE} (group privacy from RDP grows as 3**ceil(log2(group_size)); for larger "
    "groups train with user-level sampling and clipping instead)."
)


def group_epsilon(noise_multiplier, sampling_rate, steps, group_size, delta, orders=None):
    """Epsilon for groups of `group_size` examples (one person's) after DP-SGD training.

    `steps` Poisson-subsampled Gaussian steps, accounted with Renyi DP and Mironov 2017's
    group privacy (Prop. 2): a group of `k <= 2**c` examples, `c = ceil(log2(k))`, is
    `(b, 3**c * eps(2**c * b))`-RDP at every order `b >= 2`, where `eps` is the example-level
    RDP curve; the group curve is converted to `(epsilon, delta)` as `dp_accounting` converts
    every RDP figure. `group_size=1` gives the ordinary RDP epsilon (`compute_epsilon` with
    `accountant="rdp"`). The guarantee is for add-or-remove adjacency: a person with up to
    `group_size` examples, present or absent.

    Args:
        noise_multiplier: ratio of the Gaussian noise standard deviation to the clipping norm,
            >= 0 (0 gives an infinite epsilon).
        sampling_rate: probability that an example joins a given batch, in (0, 1].
        steps: number of noisy updates, a whole number >= 0.
        group_size: the most examples one person contributed, a whole number from 1 to
            `MAX_GROUP_SIZE`.
        delta: target delta in (0, 1).
        orders: the RDP orders of the group guarantee to minimise over, numbers > 1;
            `RDP_ORDERS` when None. For `group_size > 1` only the orders >= 2 are used (the
            condition of Prop. 2), and the example-level curve is evaluated at `2**c` times
            each.

    Returns:
        The group epsilon as a float (0.0 for zero steps, `math.inf` for zero noise).

    Raises:
        keras_safe._validation.ArgumentError: an argument out of range; the message names it.

    Example:
        At noise 1.1, sampling rate 0.01 and 1000 steps (example-level epsilon 1.71 at
        delta 1e-5), the group figure beside `k * epsilon` and the delta at which
        `k * epsilon` would actually hold (`k * exp((k - 1) * epsilon) * 1e-5`):

        >>> import math
        >>> one = group_epsilon(1.1, 0.01, 1000, 1, 1e-5)
        >>> for k in (2, 4, 8):
        ...     eps = group_epsilon(1.1, 0.01, 1000, k, 1e-5)
        ...     delta_k = k * math.exp((k - 1) * one) * 1e-5
        ...     print(k, f"{eps:.2f}", f"{k * one:.2f}", f"{delta_k:.2g}")
        2 4.62 3.42 0.00011
        4 13.77 6.85 0.0068
        8 45905.45 13.69 13

        For `k = 8` the noise is too weak for a useful user-level guarantee; `k * epsilon`
        is no guarantee at all there (its delta exceeds 1).
    """
    return _group_epsilon(
        [_check_segment(noise_multiplier, sampling_rate, steps, "")], group_size, delta, orders
    )


def group_epsilon_of_segments(segments, group_size, delta, orders=None):
    """Epsilon for groups of `group_size` examples after DP-SGD segments run one after another.

    Each segment is `(noise_multiplier, sampling_rate, steps)`, as in a model's privacy
    ledger; the segments compose by adding their RDP curves order by order, and the sum is
    turned into a group guarantee as in `group_epsilon` (Mironov 2017, Prop. 2).

    Args:
        segments: a list of `(noise_multiplier, sampling_rate, steps)`; segments with zero
            steps are skipped, and any with steps and zero noise makes epsilon infinite.
        group_size: the most examples one person contributed, 1 to `MAX_GROUP_SIZE`.
        delta: target delta in (0, 1).
        orders: the RDP orders of the group guarantee, as in `group_epsilon`.

    Returns:
        The group epsilon as a float (0.0 when no segment has steps).

    Raises:
        keras_safe._validation.ArgumentError: a malformed segment or an argument out of
            range; the message names it (`segments[i]` for a segment).

    Example:
        >>> both = group_epsilon_of_segments([(1.1, 0.01, 500), (2.0, 0.02, 300)], 2, 1e-5)
        >>> first = group_epsilon(1.1, 0.01, 500, 2, 1e-5)
        >>> round(first, 3), round(both, 3)
        (3.464, 4.002)
    """
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        fail(
            "segments",
            segments,
            "a list of (noise_multiplier, sampling_rate, steps) tuples",
            "pass for example [(1.1, 0.01, 1000)].",
        )
    checked = []
    for i, segment in enumerate(segments):
        if isinstance(segment, (str, bytes)) or not hasattr(segment, "__len__"):
            _segment_fail(i, segment)
        if len(segment) != 3:
            _segment_fail(i, segment)
        checked.append(_check_segment(*segment, f"segments[{i}]"))
    return _group_epsilon(checked, group_size, delta, orders)


def _segment_fail(index, segment):
    """Raises the error for a segment that is not a `(noise_multiplier, sampling_rate, steps)`
    triple."""
    fail(
        f"segments[{index}]",
        segment,
        "a (noise_multiplier, sampling_rate, steps) tuple",
        "pass three numbers, for example (1.1, 0.01, 1000).",
    )


def _check_segment(noise_multiplier, sampling_rate, steps, where):
    def name(argument):
        return f"{where} {argument}".strip() if where else argument

    noise = check_number(
        name("noise_multiplier"),
        noise_multiplier,
        low=0.0,
        fix="pass the ratio of the noise standard deviation to the clipping norm, for example "
        "1.1 (0 means no noise and an infinite epsilon).",
    )
    rate = check_probability(
        name("sampling_rate"),
        sampling_rate,
        allow_one=True,
        fix="pass the probability that an example joins a batch, batch_size / num_examples.",
    )
    count = check_number(
        name("steps"), steps, low=0, integer=True, fix="pass the number of noisy updates."
    )
    return noise, rate, count


def _check_orders(orders):
    if orders is None:
        return list(RDP_ORDERS)
    if isinstance(orders, (str, bytes)) or not hasattr(orders, "__iter__"):
        fail("orders", orders, "a list of RDP orders > 1", "pass for example [2, 4, 8, 16, 32].")
    checked = [
        check_number(
            "orders",
            order,
            low=1.0,
            low_inclusive=False,
            fix="pass RDP orders above 1, for example [2, 4, 8, 16, 32], or None for the "
            "default grid.",
        )
        for order in orders
    ]
    if not checked:
        fail("orders", orders, "a non-empty list of RDP orders > 1", "pass None for the default.")
    return checked


def _group_epsilon(segments, group_size, delta, orders):
    k = check_number(
        "group_size", group_size, low=1, high=MAX_GROUP_SIZE, integer=True, fix=_GROUP_FIX
    )
    delta = check_probability(
        "delta",
        delta,
        fix="pass a small probability well below 1/num_examples, for example "
        "keras_safe.accounting.default_delta(num_examples).",
    )
    given = _check_orders(orders)
    c = (k - 1).bit_length()  # ceil(log2(k)), exactly, for a whole k >= 1
    orders = [order for order in given if order >= 2.0] if c else given
    if not orders:
        fail(
            "orders",
            given,
            "a list with an order of 2 or more when group_size > 1 (group privacy for RDP "
            "holds at orders >= 2 only)",
            "add orders such as 2, 4, 8, or pass None for the default grid.",
        )
    segments = [s for s in segments if s[2] > 0]
    if not segments:
        return 0.0
    if any(noise == 0.0 for noise, _, _ in segments):
        return float("inf")
    scale = 2**c
    accountant = dp_accounting.rdp.RdpAccountant([scale * order for order in orders])
    with quiet_order_notices():
        for noise, rate, steps in segments:
            accountant.compose(dp_sgd_event(noise, rate, steps))
        rdp = 3**c * accountant.rdp
        epsilon, _ = dp_accounting.rdp.compute_epsilon(orders, rdp, delta)
    return float(epsilon)
