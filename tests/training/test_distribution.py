"""DP-SGD under tf.distribute: MirroredStrategy on two logical CPU devices, and
MultiWorkerMirroredStrategy with two worker processes on 127.0.0.1.

TensorFlow fixes its devices and its cluster when it starts, so the distributed runs happen in
processes this module starts and stops (with timeouts): `distributed_runs.py` trains there and
writes what it saw; the tests here compare it with independent references: the Gaussian
mechanism's standard deviation lr * sigma * C / B for the global batch (a chi-square interval
that a scale 5% off fails, so the same draw on both replicas or one replica's share alone
fails by far), a one-device run on the same batches (noise 0), and dp-accounting's epsilon for
the global sampling rate (`tests.dp_reference`). Each run happens once per test session, also
under pytest-xdist.
"""

import fcntl
import json
import math
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.training import distribution
from tests import dp_reference
from tests.statistical import assert_gaussian_scale

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_runs.py")
TIMEOUT = 400  # seconds, per run; a run takes 20-60 s on two cores

# Noise-free weights: one device and two replicas sum the same float32 terms in another order.
# Relative differences are ~1e-7; 1e-6 absolute on weights of order 1 allows a few roundings,
# while a missing or doubled term (a replica's share, the weight penalty) moves them by > 1e-3.
WEIGHT_TOLERANCE = 1e-6


def _shared_result(tmp_path_factory, name, produce):
    """Runs `produce(path)` once per test session (across xdist workers); returns its JSON."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    path = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            produce(path)
    return json.loads(path.read_text())


def _environment():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    return env


def _run_mirrored(path):
    done = subprocess.run(
        [sys.executable, RUNS, "mirrored", str(path)],
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0 and path.exists(), done.stderr[-4000:]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_workers(path):
    ports = ",".join(str(p) for p in _free_ports(2))
    outputs = [path.with_name(f"worker{i}.json") for i in range(2)]
    logs = [path.with_name(f"worker{i}.log") for i in range(2)]
    workers = []
    try:
        for i, (out, log) in enumerate(zip(outputs, logs)):
            with open(log, "w") as handle:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, RUNS, "worker", str(i), ports, str(out)],
                        env=_environment(),
                        stdout=subprocess.DEVNULL,
                        stderr=handle,
                    )
                )
        deadline = time.monotonic() + TIMEOUT
        # A worker whose peer failed would wait for it until the deadline: stop it at once.
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            if any(w.poll() not in (None, 0) for w in workers):
                break
            time.sleep(0.5)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    codes = [w.returncode for w in workers]
    errors = [log.read_text()[-3000:] for log in logs]
    assert codes == [0, 0] and all(o.exists() for o in outputs), (codes, errors)
    path.write_text(json.dumps([json.loads(o.read_text()) for o in outputs]))


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    return _shared_result(tmp_path_factory, "dp_mirrored", _run_mirrored)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return _shared_result(tmp_path_factory, "dp_multi_worker", _run_workers)


def _assert_noise_std(update, expected):
    """The update is N(0, expected^2): a chi-square interval at the 1e-7 level that a scale
    5% off falls outside of (so sqrt(2) times the deviation, the same draw on both replicas,
    and 1/sqrt(2) times it, one replica's share only, fail by far), its mean and its law."""
    samples = np.asarray(update, "float64")
    assert samples.size >= 65536
    assert_gaussian_scale(samples, expected)


# -- MirroredStrategy: two logical CPU devices -----------------------------------------------------


@pytest.mark.slow
def test_mirrored_noise_of_zero_gradients_has_the_single_device_deviation(mirrored):
    assert mirrored["replicas"] == 2
    # lr 0.1, sigma 1.3, C 2.0, global batch 16: the one-device figure lr * sigma * C / B.
    _assert_noise_std(mirrored["zero_gradient_update"], 0.1 * 1.3 * 2.0 / 16)


@pytest.mark.slow
def test_mirrored_replicas_draw_different_independent_noise(mirrored):
    # Each replica's own draw for one update, with the same user seed on both replicas.
    first, second = (np.asarray(d) for d in mirrored["replica_draws"])
    assert not np.allclose(first, second)
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / math.sqrt(first.size)
    for draw in (first, second):  # each is a 1/sqrt(2) share of the update's deviation 1
        _assert_noise_std(draw, 1 / math.sqrt(2))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["gradient_clip_dpadam_adversarial_regularized", "poisson_shards"])
def test_mirrored_noise_free_matches_one_device_on_the_same_global_batches(mirrored, run):
    result = mirrored["noise_free"][run]
    assert result["max_move"] > 1e-2  # the weights moved: the comparison is not vacuous
    assert result["max_difference"] <= WEIGHT_TOLERANCE
    distributed, single = result["ledgers"]
    assert distributed == single  # the same global steps, rate and examples
    if "losses" in result:
        np.testing.assert_allclose(*result["losses"], rtol=1e-6)


@pytest.mark.slow
def test_mirrored_poisson_shards_are_accounted_at_the_global_rate(mirrored):
    result = mirrored["noise_free"]["poisson_shards"]
    assert result["info"]["shards"] == 2
    (segment,) = result["ledgers"][0]
    # 400 examples, expected batch 40: 10 steps at q = 0.1; the rows of both replicas count.
    assert segment["steps"] == 10 and segment["sampling_rate"] == pytest.approx(0.1)
    assert abs(segment["rows"] - 400) < 6 * math.sqrt(400 * 0.9)


@pytest.mark.slow
def test_mirrored_epsilon_equals_dp_accounting_for_the_global_steps(mirrored):
    result = mirrored["epsilon"]
    # 200 examples, global batch 20, 2 epochs: 20 global steps at q = 0.1 (not 40 replica steps).
    assert result["steps"] == 20
    (segment,) = result["segments"]
    # Poisson batches drawn from the arrays: about 400 rows over the 20 steps.
    assert segment["sampling_rate"] == pytest.approx(0.1)
    assert abs(segment["rows"] - 400) < 6 * math.sqrt(400 * 0.9)
    expected = dp_reference.epsilon(1.1, 0.1, 20, 1e-5)
    assert result["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert result["history"][-1] == pytest.approx(expected, rel=1e-9)


REFUSALS = {
    "central_storage": "CentralStorageStrategy",
    "static_batch_mismatch": "global batch of this fit holds 24 examples",
    "one_replica_unclipped": "not the DP release of this step",
    "train_on_batch": "received the whole batch",
    "keras_default_step": "not the DP release of this step",
    "microbatches": "num_microbatches is not supported",
    "inner_clipnorm": "clipnorm=1.0 on the optimizer inside DPOptimizer",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_mirrored_refuses_before_any_step(mirrored, case):
    result = mirrored["refused"][case]
    assert result["error"] is not None, case
    assert result["error"]["type"] == "PrivacyError"
    assert REFUSALS[case] in result["error"]["message"]
    assert "Fix:" in result["error"]["message"]
    assert result["weights_unchanged"] and result["steps"] == 0


@pytest.mark.slow
def test_mirrored_batch_above_the_declared_global_batch_is_refused_in_the_step(mirrored):
    # A dataset of 24-example batches (no static size) declared as batch_size=12: the step
    # sees the rows of both replicas (24) and refuses before it releases or charges anything.
    result = mirrored["refused"]["runtime_batch_mismatch"]
    assert result["error"]["type"] == "PrivacyError"
    message = result["error"]["message"]
    assert "refused this step" in message and "batch_size=12" in message and "[24]" in message
    assert "Fix:" in message
    assert result["weights_unchanged"] and result["steps"] == 0 and result["segments"] == []


# -- MultiWorkerMirroredStrategy: two worker processes ---------------------------------------------


@pytest.mark.slow
def test_multi_worker_noise_free_matches_one_device_and_the_workers_agree(workers):
    for result in workers:
        assert result["replicas"] == 2
        run = result["noise_free"]
        assert run["max_move"] > 1e-2 and run["max_difference"] <= WEIGHT_TOLERANCE
        distributed, single = run["ledgers"]
        assert distributed == single
    np.testing.assert_array_equal(*(np.concatenate(r["noise_free"]["weights"]) for r in workers))


@pytest.mark.slow
def test_multi_worker_noise_has_the_single_device_deviation_with_one_seed_everywhere(workers):
    first, second = (np.asarray(r["zero_gradient_update"]) for r in workers)
    np.testing.assert_array_equal(first, second)  # one update, applied on both workers
    _assert_noise_std(first, 0.1 * 1.3 * 2.0 / 16)


@pytest.mark.slow
def test_multi_worker_epsilon_equals_dp_accounting_for_the_global_steps(workers):
    expected = dp_reference.epsilon(1.1, 0.1, 20, 1e-5)
    for result in workers:
        run = result["epsilon"]
        assert run["steps"] == 20
        (segment,) = run["segments"]
        assert segment["sampling_rate"] == pytest.approx(0.1)
        assert abs(segment["rows"] - 800) < 6 * math.sqrt(800 * 0.9)
        assert run["epsilon"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_multi_worker_refuses_unsharded_poisson_batches_and_accounts_arrays_globally(workers):
    fix = "poisson_batches(x, y, batch_size=..., strategy=strategy)"
    for result in workers:
        refused = result["refused"]
        # A poisson_batches dataset built without the strategy: each worker would keep its
        # slice of its own sample; refused before any step.
        error = refused["unsharded_poisson"]
        assert error["type"] == "PrivacyError" and fix in error["message"]
        assert refused["steps"] == 0
        # Arrays: refused, or drawn as one Poisson sample per replica shard and accounted
        # at the global rate (400 examples, global batch 40: 10 steps at rate 0.1).
        if refused["arrays"] is not None:
            assert (
                refused["arrays"]["type"] == "PrivacyError" and fix in refused["arrays"]["message"]
            )
            assert refused["arrays_segments"] == []
        else:
            (segment,) = refused["arrays_segments"]
            assert segment["steps"] == 10 and segment["sampling_rate"] == pytest.approx(0.1)
            assert abs(segment["rows"] - 400) < 6 * math.sqrt(400 * 0.9)


# -- In this process ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy_class", [tf.distribute.ParameterServerStrategy, tf.distribute.TPUStrategy]
)
def test_unsupported_strategies_are_refused(strategy_class):
    # Neither can be built here (no cluster, no TPU); the check looks at the class only.
    strategy = object.__new__(strategy_class)
    with pytest.raises(PrivacyError, match=strategy_class.__name__) as error:
        distribution.check_strategy(strategy)
    assert "Fix:" in str(error.value)


def test_supported_strategies_pass():
    distribution.check_strategy(None)
    distribution.check_strategy(tf.distribute.get_strategy())
    distribution.check_strategy(tf.distribute.OneDeviceStrategy("/cpu:0"))
    distribution.check_strategy(tf.distribute.MirroredStrategy(["/cpu:0"]))


def test_poisson_shards_are_disjoint_independent_samples_at_the_global_rate():
    # What poisson_batches needs of a strategy: its number of replicas in sync.
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    n, batch, steps = 200, 20, 400
    x = np.arange(n, dtype="float32")[:, None]
    data = keras_safe.privacy.poisson_batches(
        x, np.zeros(n), batch_size=batch, epochs=steps / 10, seed=5, strategy=two_replicas
    )
    info = keras_safe.privacy.sampling.poisson_info(data)
    assert (info.shards, info.steps, info.batch_size) == (2, steps, batch)
    rows = info.max_batch_size
    counts = np.zeros(n)
    sizes = []
    for xb, _, wb in data.as_numpy_iterator():
        assert xb.shape[0] == 2 * rows
        halves = []
        for shard in range(2):
            mask = wb[shard * rows : (shard + 1) * rows] > 0
            chosen = xb[shard * rows : (shard + 1) * rows, 0][mask].astype(int)
            # Each replica's rows hold examples of its own half of the data, each at most once.
            assert np.all(chosen // (n // 2) == shard) and len(set(chosen)) == len(chosen)
            counts[chosen] += 1
            halves.append(len(chosen))
        sizes.append(halves)
    q = batch / n
    # Every example joins each step with probability q: its count is Binomial(steps, q).
    statistic = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
    assert stats.chi2.sf(statistic, n) > 1e-6 and stats.chi2.cdf(statistic, n) > 1e-6
    # The two shards' sample sizes are independent from step to step.
    sizes = np.asarray(sizes)
    assert abs(np.corrcoef(sizes[:, 0], sizes[:, 1])[0, 1]) < 5 / math.sqrt(steps)
