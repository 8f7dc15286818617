"""Why older accountants say "about 3" for the MNIST setting where keras_safe says 2.60.

Run: `python benchmarks/rdp_conversion.py` (about a second); it writes
`benchmarks/results/rdp_conversion.json`, the source of the README's figures about it.

The setting every DP-SGD tutorial uses: 60,000 examples, batch 256, noise multiplier 1.1, 60
epochs, delta 1e-5, Poisson sampling. The number of steps is the one `python -m keras_safe
epsilon` reports. One RDP curve (dp-accounting's `RdpAccountant`), two choices varied:

- the Renyi orders: keras_safe's grid (1.1 to 11 in steps of 0.1, 12 to 63, 128 to 1024) or the
  integers 2 to 64;
- the conversion from RDP to (epsilon, delta): the one dp-accounting uses (Canonne, Kamath and
  Steinke 2020, also Balle et al. 2020) or the older epsilon = RDP(alpha) + log(1/delta)/(alpha-1)
  (Mironov 2017, Proposition 3), which TF Privacy's tutorials used when they printed 3.01.
"""

import contextlib
import io
import json
import math
import pathlib
import re

import dp_accounting
import numpy as np

from keras_safe import cli
from keras_safe.accounting import RDP_ORDERS

NUM_EXAMPLES, BATCH_SIZE, EPOCHS, NOISE, DELTA = 60000, 256, 60, 1.1, 1e-5
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "rdp_conversion.json"
GRIDS = {"keras_safe": [float(order) for order in RDP_ORDERS], "integer": list(range(2, 65))}


def cli_epsilon():
    """epsilon and the number of steps as `python -m keras_safe epsilon` prints them."""
    settings = {"num-examples": NUM_EXAMPLES, "batch-size": BATCH_SIZE, "epochs": EPOCHS,
                "noise-multiplier": NOISE, "delta": DELTA}  # fmt: skip
    args = ["epsilon", *(f"--{name}={value}" for name, value in settings.items())]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(args)
    first = printed.getvalue().splitlines()[0]
    match = re.match(r"epsilon = (\S+) .* (\d+) steps at sampling rate", first)
    return float(match.group(1)), int(match.group(2))


def rdp_curve(orders, steps):
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(
        BATCH_SIZE / NUM_EXAMPLES, dp_accounting.GaussianDpEvent(NOISE)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant


def old_conversion(orders, rdp):
    """min over orders of RDP(alpha) + log(1/delta) / (alpha - 1), and its order."""
    epsilons = np.asarray(rdp) + math.log(1 / DELTA) / (np.asarray(orders, float) - 1)
    best = int(np.argmin(epsilons))
    return float(epsilons[best]), float(orders[best])


def main():
    epsilon, steps = cli_epsilon()
    results = {
        "setting": {
            "num_examples": NUM_EXAMPLES,
            "batch_size": BATCH_SIZE,
            "epochs": EPOCHS,
            "noise_multiplier": NOISE,
            "delta": DELTA,
            "steps": steps,
        },
        "cli_epsilon": epsilon,
    }
    print(f"MNIST setting, {steps} steps: python -m keras_safe epsilon prints {epsilon:.3f}")
    for grid, orders in GRIDS.items():
        accountant = rdp_curve(orders, steps)
        new, new_order = accountant.get_epsilon_and_optimal_order(DELTA)
        old, old_order = old_conversion(orders, accountant._rdp)
        results[grid] = {
            "new_conversion": {"epsilon": float(new), "order": float(new_order)},
            "old_conversion": {"epsilon": old, "order": old_order},
        }
        print(
            f"{grid:>10} orders: dp-accounting's conversion {new:.3f} (order {new_order:g}), "
            f"the older conversion {old:.3f} (order {old_order:g})"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
