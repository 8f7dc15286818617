"""Tests of keras_safe.accounting against published and independently computed figures."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from keras_safe.accounting import (
    DPSchedule,
    compute_epsilon,
    default_delta,
    noise_multiplier_for_epsilon,
    privacy_statement,
)
from tests import dp_reference
from tests.testing import REPO_ROOT

# --- independent references ------------------------------------------------------------------


def _rdp_sampled_gaussian(q, sigma, alpha):
    """RDP of one Poisson-sampled Gaussian step at an integer order `alpha`.

    Mironov, Talwar and Zhang 2019 (Sec. 3.3): for integer alpha,
    A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)) and the
    RDP is log(A_alpha) / (alpha - 1). Computed here in log space with scipy only.
    """
    k = np.arange(alpha + 1)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binom + (alpha - k) * np.log1p(-q) + k * np.log(q) + (k * k - k) / (2 * sigma**2)
    return logsumexp(terms) / (alpha - 1)


def _eps_classic_conversion(q, sigma, steps, delta, orders=range(2, 257)):
    """Epsilon with the original RDP conversion eps = rdp + log(1/delta)/(alpha - 1)."""
    return min(
        steps * _rdp_sampled_gaussian(q, sigma, a) + math.log(1 / delta) / (a - 1) for a in orders
    )


def _eps_cks_conversion(q, sigma, steps, delta, orders=range(2, 257)):
    """Epsilon with Canonne, Kamath and Steinke 2020's conversion (Prop. 12), integer orders."""
    return min(
        steps * _rdp_sampled_gaussian(q, sigma, a)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in orders
    )


def _eps_exact_gaussian(sigma, compositions, delta):
    """Exact epsilon of `compositions` Gaussian mechanisms (Balle and Wang 2018, Thm. 8)."""
    mu = math.sqrt(compositions) / sigma

    def gap(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 500.0)


# --- published figures -----------------------------------------------------------------------


def test_opacus_published_rdp_figure():
    # Opacus' accountant tests: RDP, sigma=1.5, q=0.04, 2,250 steps, delta=1e-5 -> 7.3291.
    eps = compute_epsilon(steps=2250, sampling_rate=0.04, noise_multiplier=1.5, delta=1e-5)
    assert abs(eps - 7.3291) < 5e-4, eps


def test_matches_tensorflow_privacy_rdp_computation():
    # Reference: tensorflow-privacy 0.9.0 (with dp-accounting 0.4.3, TF 2.15.1),
    #   compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy(
    #       n=60000, batch_size=250, noise_multiplier=1.1, epochs=60, delta=1e-5)
    #   -> (2.562959698937955, 8.0)
    # i.e. 14,400 steps at q = 250/60000, RDP orders [1.25, 1.5, ..., 4.5] + 5..63 + [128, 256,
    # 512]. keras_safe uses a finer grid of orders (1.1..11.0 by 0.1, 12..63, 128..1024), which
    # can only lower epsilon; here the optimum moves from order 8 to 8.2.
    tf_privacy_eps = 2.562959698937955
    eps = compute_epsilon(60000, 250, 60, noise_multiplier=1.1, delta=1e-5)  # 240 steps/epoch
    assert eps <= tf_privacy_eps + 1e-9
    assert tf_privacy_eps - eps < 5e-3, eps
    # The same settings through an independent implementation of the RDP formula agree with
    # TF Privacy's figure (both optimum at the integer order 8).
    independent = _eps_cks_conversion(250 / 60000, 1.1, 14400, 1e-5)
    assert abs(independent - tf_privacy_eps) < 1e-6, independent


@pytest.mark.parametrize(
    "noise, epochs, published",
    [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10)],
)
def test_tensorflow_privacy_tutorial_table(noise, epochs, published):
    # TF Privacy's MNIST tutorial table (tutorials/README.md): 60,000 examples, batch 256,
    # delta=1e-5: noise 1.1 / 60 epochs -> eps 3.01, 1.3 / 15 -> 1.19, 0.7 / 45 -> 7.10.
    # Those figures used the original RDP-to-DP conversion; keras_safe's accountant uses the
    # tighter conversion of Canonne et al. 2020, so its epsilon is lower.
    # TF Privacy counts ceil(epochs * n / batch) steps; keras_safe's epoch is ceil(n / batch)
    # steps (as fit takes), so the table is checked in the steps form.
    q = 256 / 60000
    steps = math.ceil(epochs * 60000 / 256)
    classic = _eps_classic_conversion(q, noise, steps, 1e-5)
    assert abs(classic - published) < 0.03, classic  # the reference reproduces the table
    eps = compute_epsilon(steps=steps, sampling_rate=q, noise_multiplier=noise, delta=1e-5)
    assert eps <= published
    assert eps > 0.75 * published
    # Against an independent implementation of the tighter conversion on integer orders:
    # keras_safe also uses fractional orders, so it may only be slightly lower.
    cks = _eps_cks_conversion(q, noise, steps, 1e-5)
    assert cks - 0.1 < eps <= cks + 1e-9, (eps, cks)


def test_pld_matches_exact_gaussian_composition():
    # Without sampling, DP-SGD is a composition of Gaussian mechanisms, whose exact epsilon is
    # known in closed form (analytic Gaussian mechanism). PLD must be tight, RDP above.
    exact = _eps_exact_gaussian(1.1, 15, 1e-5)
    pld = compute_epsilon(
        steps=15, sampling_rate=1.0, noise_multiplier=1.1, delta=1e-5, accountant="pld"
    )
    rdp = compute_epsilon(steps=15, sampling_rate=1.0, noise_multiplier=1.1, delta=1e-5)
    assert abs(pld - exact) < 1e-3 * exact, (pld, exact)
    assert rdp > exact


@pytest.mark.parametrize(
    "n, batch, epochs, noise",
    [(60000, 256, 15, 1.1), (1000, 50, 10, 0.8), (50000, 500, 3, 2.0)],
)
def test_pld_not_above_rdp(n, batch, epochs, noise):
    rdp = compute_epsilon(n, batch, epochs, noise_multiplier=noise, delta=1e-5)
    pld = compute_epsilon(n, batch, epochs, noise_multiplier=noise, delta=1e-5, accountant="pld")
    assert pld <= rdp
    assert pld > 0.5 * rdp


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    by_epochs = [
        compute_epsilon(10000, 100, e, noise_multiplier=1.0, delta=1e-5) for e in (1, 2, 4)
    ]
    assert by_epochs[0] < by_epochs[1] < by_epochs[2]
    by_noise = [compute_epsilon(10000, 100, 2, noise_multiplier=s, delta=1e-5) for s in (0.8, 1, 2)]
    assert by_noise[0] > by_noise[1] > by_noise[2]


def test_both_forms_agree_and_edge_values():
    # An epoch is ceil(60,000 / 256) = 235 steps (what fit and poisson_batches take): 15 epochs
    # are 3,525 steps at q = 256/60000, not ceil(15 * 60000 / 256) = 3,516.
    a = compute_epsilon(60000, 256, 15, noise_multiplier=1.1, delta=1e-5)
    b = compute_epsilon(steps=3525, sampling_rate=256 / 60000, noise_multiplier=1.1, delta=1e-5)
    assert a == b == pytest.approx(dp_reference.epsilon(1.1, 256 / 60000, 3525, 1e-5), rel=1e-12)
    assert compute_epsilon(steps=0, sampling_rate=0.1, noise_multiplier=1.0, delta=1e-5) == 0.0
    assert math.isinf(compute_epsilon(1000, 10, 1, noise_multiplier=0.0, delta=1e-5))
    # delta defaults to default_delta(num_examples)
    assert compute_epsilon(1000, 10, 1, noise_multiplier=1.0) == compute_epsilon(
        1000, 10, 1, noise_multiplier=1.0, delta=1000**-1.1
    )


def test_default_delta_rule():
    for n in (10, 3000, 60000, 10**6):
        assert default_delta(n) == pytest.approx(math.exp(-1.1 * math.log(n)), rel=1e-12)
        assert default_delta(n) < 1 / n
    with pytest.raises(ValueError, match="num_examples"):
        default_delta(0)


# --- calibration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accountant, target, n, batch, epochs",
    [
        ("rdp", 1.0, 10000, 100, 5),
        ("rdp", 3.0, 60000, 256, 15),
        ("rdp", 8.0, 10000, 100, 5),
        ("pld", 2.0, 5000, 100, 4),
    ],
)
def test_calibration_round_trip(accountant, target, n, batch, epochs):
    noise = noise_multiplier_for_epsilon(
        target, n, batch, epochs, delta=1e-5, accountant=accountant
    )
    eps = compute_epsilon(
        n, batch, epochs, noise_multiplier=noise, delta=1e-5, accountant=accountant
    )
    assert eps <= target, (eps, target)  # never above the budget
    assert target - eps < 1e-3, (eps, target)
    # ...and it is the smallest such noise: a little less noise breaks the budget.
    less = compute_epsilon(
        n, batch, epochs, noise_multiplier=noise - 1e-4, delta=1e-5, accountant=accountant
    )
    assert less > target


def test_calibration_steps_form():
    noise = noise_multiplier_for_epsilon(7.3291, steps=2250, sampling_rate=0.04, delta=1e-5)
    assert noise == pytest.approx(1.5, abs=1e-3)  # inverse of the Opacus figure


# --- bad input -------------------------------------------------------------------------------

_GOOD = dict(num_examples=1000, batch_size=10, epochs=1, noise_multiplier=1.0, delta=1e-5)


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -5}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": 1001}, "batch_size"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": None}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"num_examples": 0}, "num_examples"),
        ({"epochs": 0}, "epochs"),
        ({"accountant": "moments"}, "accountant"),
        ({"steps": 10, "sampling_rate": 0.1}, "steps"),
    ],
)
def test_compute_epsilon_bad_input(changes, name):
    with pytest.raises(ValueError, match=name):
        compute_epsilon(**{**_GOOD, **changes})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(steps=-1, sampling_rate=0.1), "steps"),
        (dict(steps=10, sampling_rate=0.0), "sampling_rate"),
        (dict(steps=10, sampling_rate=1.5), "sampling_rate"),
        (dict(steps=10), "sampling_rate"),
        (dict(steps=10, sampling_rate=0.1, delta=None), "delta"),
    ],
)
def test_steps_form_bad_input(kwargs, name):
    kwargs = {"noise_multiplier": 1.0, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=name):
        compute_epsilon(**kwargs)


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf")])
def test_calibration_bad_target(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for_epsilon(target, 1000, 10, 1, delta=1e-5)


def test_calibration_unreachable_target():
    with pytest.raises(ValueError, match="target_epsilon.*unreachable"):
        noise_multiplier_for_epsilon(1e-3, steps=100000, sampling_rate=0.5, delta=1e-5)


def test_calibration_bad_settings_name_argument():
    with pytest.raises(ValueError, match="batch_size"):
        noise_multiplier_for_epsilon(1.0, 100, 200, 1, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        noise_multiplier_for_epsilon(1.0, 100, 10, 1, delta=2.0)


# --- statement and command line --------------------------------------------------------------


def test_privacy_statement_content():
    # Poisson figure: tensorflow-privacy 0.9.0's compute_dp_sgd_privacy(60000, 256, 1.1, 15,
    # 1e-5) gives 1.2813000161257042 (order 12, in both order grids) for its 3,516 steps.
    tf_privacy = privacy_statement(
        steps=3516, sampling_rate=256 / 60000, noise_multiplier=1.1, delta=1e-5
    )
    assert "1.281" in tf_privacy
    text = privacy_statement(60000, 256, 15, noise_multiplier=1.1, delta=1e-5)
    # keras_safe's 15 epochs are 15 * 235 = 3,525 steps.
    assert "3525 noisy steps" in text
    assert f"{dp_reference.epsilon(1.1, 256 / 60000, 3525, 1e-5):12.3f}" in text
    # Once-per-epoch figure: 15 Gaussian mechanisms with no amplification. Its RDP bound lies
    # above the exact value (here 22.85 against 20.56); the PLD figure matches it.
    exact = _eps_exact_gaussian(1.1, 15, 1e-5)
    figures = [float(line.split()[-1]) for line in text.splitlines() if "(**):" in line]
    assert len(figures) == 1 and exact < figures[0] < 1.15 * exact, (figures, exact)
    pld_text = privacy_statement(60000, 256, 15, noise_multiplier=1.1, delta=1e-5, accountant="pld")
    figures = [float(line.split()[-1]) for line in pld_text.splitlines() if "(**):" in line]
    assert abs(figures[0] - exact) < 2e-3, (figures, exact)
    for phrase in (
        "Poisson sampling",
        "shuffle",
        "one training example",
        "delta = 1e-05",
        "Assumptions",
        "checkpoint",
    ):
        assert phrase in " ".join(text.split()), phrase
    default = " ".join(privacy_statement(60000, 256, 15, noise_multiplier=1.1).split())
    assert "1/n^1.1" in default and f"{60000**-1.1:.3g}" in default


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "keras_safe", "epsilon", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )


def test_cli_prints_epsilon_and_statement():
    result = _run_cli(
        "--steps", "3516", "--sampling-rate", str(256 / 60000),
        "--noise-multiplier", "1.1", "--delta", "1e-5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    # 1.2813 is tensorflow-privacy 0.9.0's figure for these settings (see above).
    assert first.startswith("epsilon = 1.281 "), first
    assert "Poisson sampling" in result.stdout and "Unit of privacy" in result.stdout
    # The epochs form: 15 epochs of ceil(60000 / 256) = 235 steps, the steps fit takes.
    result = _run_cli(
        "--num-examples", "60000", "--batch-size", "256", "--epochs", "15",
        "--noise-multiplier", "1.1", "--delta", "1e-5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    expected = dp_reference.epsilon(1.1, 256 / 60000, 3525, 1e-5)
    assert first.startswith(f"epsilon = {expected:.3f} "), first
    assert "3525 steps" in first and "3525 noisy steps" in result.stdout


def test_cli_target_epsilon_prints_noise():
    result = _run_cli(
        "--steps", "2250", "--sampling-rate", "0.04", "--target-epsilon", "7.3291",
        "--delta", "1e-5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("noise_multiplier = ")
    # Inverse of the Opacus figure (sigma=1.5 gives 7.3291).
    assert abs(float(first.split()[2]) - 1.5) < 1e-3, first


def test_cli_bad_input_names_argument(capsys):
    import argparse

    from keras_safe import cli

    parser = cli.add_epsilon_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--num-examples", "100", "--batch-size", "500", "--epochs", "1",
         "--noise-multiplier", "1.0"]
    )  # fmt: skip
    assert cli.run_epsilon(args) == 2
    captured = capsys.readouterr()
    assert "batch_size" in captured.err and captured.out == ""
    args = parser.parse_args(["--steps", "100", "--sampling-rate", "0.01", "--noise-multiplier",
                              "-1", "--delta", "1e-5"])  # fmt: skip
    assert cli.run_epsilon(args) == 2
    assert "noise_multiplier" in capsys.readouterr().err


# --- one epoch, one delta rule, shuffled batches ---------------------------------------------


@pytest.mark.parametrize(
    "n, batch, epochs", [(1797, 64, 30), (60000, 256, 15), (1000, 100, 2.5), (10, 3, 1)]
)
def test_an_epoch_is_the_steps_fit_takes(n, batch, epochs):
    # fit and poisson_batches take ceil(n / batch) steps per epoch; compute_epsilon, the
    # schedule and the statement count the same: ceil(epochs * ceil(n / batch)) steps.
    steps = math.ceil(epochs * -(-n // batch) - 1e-9)
    schedule, planned = DPSchedule.from_arguments(n, batch, epochs, noise_multiplier=1.0)
    assert planned == steps and schedule.batches_per_epoch() == -(-n // batch)
    delta = 0.1 / n
    eps = compute_epsilon(n, batch, epochs, noise_multiplier=1.0, delta=delta)
    assert eps == pytest.approx(dp_reference.epsilon(1.0, batch / n, steps, delta), rel=1e-12)
    text = " ".join(privacy_statement(n, batch, epochs, noise_multiplier=1.0, delta=delta).split())
    assert f"({steps} noisy steps;" in text


@pytest.mark.parametrize(
    "call",
    [
        lambda d: compute_epsilon(1000, 10, 1, noise_multiplier=1.0, delta=d),
        lambda d: noise_multiplier_for_epsilon(1.0, 1000, 10, 1, delta=d),
        lambda d: privacy_statement(1000, 10, 1, noise_multiplier=1.0, delta=d),
        lambda d: compute_epsilon(
            steps=10, sampling_rate=0.01, num_examples=1000, noise_multiplier=1.0, delta=d
        ),
        lambda d: DPSchedule(1.0, 1000, 10).epsilon(100, d),
    ],
)
@pytest.mark.parametrize("delta", [1e-3, 0.01, 0.5])
def test_a_delta_of_one_over_n_or_more_is_refused_with_the_fix(call, delta):
    # delta = 1/n allows publishing one example in full; the compute_epsilon(...,
    # delta=0.5) returned "epsilon 0.97".
    with pytest.raises(ValueError, match=r"`delta` must be below 1/num_examples = 0\.001") as err:
        call(delta)
    assert f"default_delta(1000) = {1000**-1.1:.3g}" in str(err.value)
    call(0.999e-3)  # just below 1/n is accepted


def test_the_default_delta_is_the_one_rule_everywhere():
    n = 1797
    assert compute_epsilon(n, 64, 3, noise_multiplier=1.0) == pytest.approx(
        dp_reference.epsilon(1.0, 64 / n, 3 * 29, n**-1.1), rel=1e-12
    )
    text = " ".join(privacy_statement(n, 64, 3, noise_multiplier=1.0).split())
    assert f"delta = {n**-1.1:.3g}" in text and "1/n^1.1" in text


@pytest.mark.parametrize("n, batch, epochs, mechanisms", [(1000, 100, 3, 3), (1000, 64, 2.5, 3)])
def test_shuffled_batches_are_accounted_without_amplification(n, batch, epochs, mechanisms):
    # Fixed-size batches: each epoch begun is one Gaussian mechanism at rate 1 (zero-out
    # adjacency: an example is in one batch of an epoch), whatever the batch size.
    expected = dp_reference.dp_sgd_epsilon([(1.2, 1.0, mechanisms)], 1e-5)
    eps = compute_epsilon(n, batch, epochs, noise_multiplier=1.2, delta=1e-5, sampling="shuffle")
    assert eps == pytest.approx(expected, rel=1e-12)
    assert eps > compute_epsilon(n, batch, epochs, noise_multiplier=1.2, delta=1e-5)
    # In the steps form nothing tells the epochs apart: every step is one mechanism.
    eps_steps = compute_epsilon(
        steps=7, sampling_rate=0.1, noise_multiplier=1.2, delta=1e-5, sampling="shuffle"
    )
    assert eps_steps == pytest.approx(dp_reference.dp_sgd_epsilon([(1.2, 1.0, 7)], 1e-5))
    text = privacy_statement(n, batch, epochs, noise_multiplier=1.2, delta=1e-5, sampling="shuffle")
    line = next(row for row in text.splitlines() if "epsilon of this run" in row)
    assert "shuffled batches" in line and line.endswith(f"{expected:.3f}")
    noise = noise_multiplier_for_epsilon(4.0, n, batch, epochs, delta=1e-5, sampling="shuffle")
    assert 3.99 < dp_reference.dp_sgd_epsilon([(noise, 1.0, mechanisms)], 1e-5) <= 4.0


def test_schedule_rules_for_microbatches_and_accumulation():
    # Microbatches of several examples: sensitivity 2C, so half the noise is accounted; with
    # gradient accumulation over k batches each batch draws 1/sqrt(k) of the noise.
    s = DPSchedule(2.0, 1000, 50, num_microbatches=10, accumulation_steps=4)
    assert s.sensitivity_factor == 2.0 and s.accounted_noise == pytest.approx(0.5)
    assert s.noise_stddev(1.5) == pytest.approx(1.5 * 2.0 / 2.0) and s.divisor == 10
    assert DPSchedule(2.0, 1000, 50).divisor == 50
    assert DPSchedule(2.0, 1000, 50, num_microbatches=50).sensitivity_factor == 1.0
    assert s.epsilon(60, 1e-5) == pytest.approx(dp_reference.epsilon(0.5, 0.05, 60, 1e-5))
