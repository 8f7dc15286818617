"""Epsilon computed with dp-accounting directly: the independent reference for every test.

Nothing here imports keras_safe: a test that compares keras_safe's epsilon (ledger,
`compute_epsilon`, `PrivacyBudget`, the statement, the CLI) with these functions compares two
independent computations. The RDP orders are written out here again on purpose.
"""

import dp_accounting

# The Renyi orders of the reference (the same grid keras_safe documents, written independently).
ORDERS = (
    [1.0 + i / 10.0 for i in range(1, 101)]
    + [float(order) for order in range(12, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)


def _accountant(accountant):
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant(ORDERS)
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(accountant)


def dp_sgd_epsilon(segments, delta, accountant="rdp"):
    """Epsilon of Poisson-subsampled Gaussian steps `[(noise_multiplier, rate, steps), ...]`."""
    acc = _accountant(accountant)
    for noise, rate, steps in segments:
        if steps == 0:
            continue
        if noise == 0:
            return float("inf")
        event = dp_accounting.GaussianDpEvent(noise)
        if rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(rate, event)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    return float(acc.get_epsilon(delta))


def epsilon(noise_multiplier, sampling_rate, steps, delta, accountant="rdp"):
    """Epsilon of one DP-SGD segment."""
    return dp_sgd_epsilon([(noise_multiplier, sampling_rate, steps)], delta, accountant)
