"""Mutation check of the privacy path: does the default test suite catch small privacy bugs?

Run by hand from the repository root (it is not a test module, pytest does not collect it):

    python tests/mutations.py                  # every mutation in MUTATIONS
    python tests/mutations.py --only noise_std_x0.95 --only clip_1.03C
    python tests/mutations.py --list           # the table of mutations, nothing run

It copies the package and the tests to a scratch directory, checks that the named tests pass on
the unmutated copy (the baseline: a test that already fails there cannot catch anything and is
deselected), then applies ONE mutation at a time (a file, an exact text, its replacement), runs
the named tests against the copy with `-m "not slow"`, and prints one row per mutation:

- CAUGHT: a test failed (the first failing test is named);
- SURVIVED: every test passed with the bug in place: the tests must get stronger;
- ANCHOR-MISSING: the exact text is not in the file (or is there more than once): the code
  moved, so the entry needs a new anchor;
- ERROR: pytest could not run (collection error, timeout).

The copy is what the tests import: the runs start in the scratch directory with it first on
PYTHONPATH (ahead of the editable install), and a probe plugin asserts, inside every run, that
`keras_safe.__file__` lies in the copy.

To add a mechanism, add a `Mutation` row to MUTATIONS: the smallest textual change that would
be a privacy bug, and the fast tests that must catch it.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the scratch copy holds: the package, the tests, and what the tests read.
COPIED = ("keras_safe", "tests", "examples", "setup.cfg", "pyproject.toml", "README.md")
TIMEOUT = 1200  # seconds per pytest run


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One small privacy bug: in `file`, the exact text `old` (found once) becomes `new`."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple
    why: str = ""


NOISE = ("tests/optimizers/test_noise_statistics.py",)
EPSILON = ("tests/optimizers/test_dp.py", "tests/audit/test_canary.py")
DP_STATS = ("tests/preprocessing/test_dp_stats.py",)
ENFORCEMENT = ("tests/training/test_enforcement.py",)
INDEPENDENCE = ("tests/privacy/independence/test_analysis.py",)
SIDE_EFFECTS = ("tests/privacy/independence/test_side_effects.py",)
CALLER_BATCHES = ("tests/training/test_caller_batches.py",)
OWNERSHIP = ("tests/training/test_ownership.py",)

MUTATIONS = (
    # -- the Gaussian noise of the release (optimizers/dp.py) -------------------------------------
    Mutation(
        "noise_std_x0.95",
        "keras_safe/optimizers/dp.py",
        "stddev = self.schedule().noise_stddev(self.l2_norm_clip)",
        "stddev = 0.95 * self.schedule().noise_stddev(self.l2_norm_clip)",
        NOISE,
        "5% less noise than the accountant assumes",
    ),
    Mutation(
        "secure_noise_std_x0.95",
        "keras_safe/optimizers/noise.py",
        "noise = tf.round(_normal64(size, seed) * (stddev / grid))",
        "noise = tf.round(_normal64(size, seed) * (0.95 * stddev / grid))",
        NOISE,
        "secure_noise=True draws 5% less noise",
    ),
    Mutation(
        "noise_divisor_x1.05",
        "keras_safe/optimizers/dp.py",
        "denominator = tf.cast(denominator, tf.float32)",
        "denominator = tf.cast(denominator, tf.float32) * 1.05",
        NOISE,
        "the release divided by 1.05 B",
    ),
    Mutation(
        "accumulation_noise_split",
        "keras_safe/accounting/schedule.py",
        "return l2_norm_clip * self.noise_multiplier / math.sqrt(self.accumulation_steps)",
        "return l2_norm_clip * self.noise_multiplier / self.accumulation_steps**0.55",
        NOISE,
        "each accumulated batch adds less than 1/sqrt(k) of the noise",
    ),
    Mutation(
        "noise_not_fresh",
        "keras_safe/optimizers/dp.py",
        "self._noise_draws.assign_add(1)",
        "self._noise_draws.assign_add(0)",
        ("tests/optimizers/test_dp.py",),
        "every step draws the same noise",
    ),
    Mutation(
        "poisson_divisor_drawn_rows",
        "keras_safe/training/train_step.py",
        "dp.privatize(clipped, schedule.divisor, variables, gate=allowed)",
        "dp.privatize(clipped, _rows(x, sample_weight), variables, gate=allowed)",
        NOISE,
        "Poisson batches divided by the examples drawn, not the expected batch size",
    ),
    # -- clipping and the per-example norm bounds -------------------------------------------------
    Mutation(
        "clip_1.03C",
        "keras_safe/privacy/per_example/clipping.py",
        'clip = tf.cast(l2_norm_clip, "float64")',
        'clip = tf.cast(l2_norm_clip, "float64") * 1.03',
        (
            "tests/training/test_train_step.py",
            "tests/optimizers/test_dp.py",
            "tests/test_testing.py",
        ),
        "examples clipped at 1.03 C",
    ),
    Mutation(
        "norm_bound_no_inflation",
        "keras_safe/privacy/per_example/numerics.py",
        "return norms * ((1.0 + 2.0 * gamma(count, u)) * (1.0 + 2.0 * u))",
        "return norms",
        ("tests/privacy/per_example/test_forms.py",),
        "float32 norms without their rounding bound can underestimate",
    ),
    # -- Poisson sampling (privacy/sampling.py: poisson_batches, and fit's epoch_batches) --------
    Mutation(
        "poisson_rate_x0.95",
        "keras_safe/privacy/sampling.py",
        "< q)[:, 0] + low",
        "< 0.95 * q)[:, 0] + low",
        ("tests/privacy/test_sampling_statistics.py",),
        "examples drawn at 0.95 q",
    ),
    Mutation(
        "user_rate_x0.95",
        "keras_safe/privacy/sampling.py",
        "tf.where(generator.uniform([num_users]) < q)",
        "tf.where(generator.uniform([num_users]) < 0.95 * q)",
        ("tests/privacy/test_user_sampling.py",),
        "users drawn at 0.95 q",
    ),
    Mutation(
        "user_rows_first_k",
        "keras_safe/privacy/sampling.py",
        "tf.argsort(slot * 2**bits + noise)",
        "tf.argsort(slot * 2**bits + 0 * noise)",
        ("tests/privacy/test_user_sampling.py",),
        "a sampled user's first k rows instead of a uniform subset",
    ),
    Mutation(
        "user_slot_mean_loss",
        "keras_safe/privacy/per_example/clipping.py",
        "return tf.reduce_sum(grouped, axis=1), checks",
        "return tf.reduce_mean(grouped, axis=1), checks",
        ("tests/privacy/per_example/test_user_clipping.py",),
        "a user's slot clipped as the mean of its rows' gradients, not their sum",
    ),
    Mutation(
        "user_two_in_a_slot",
        "keras_safe/training/train_step.py",
        "one_user = tf.reduce_all(tf.logical_or(~filled, tf.equal(low, high)))",
        "one_user = tf.reduce_all(tf.logical_or(~filled, tf.equal(low, low)))",
        ("tests/training/test_user_level.py",),
        "two users' examples in one slot go unchecked",
    ),
    Mutation(
        "user_in_two_slots",
        "keras_safe/training/train_step.py",
        "distinct = tf.equal(tf.size(tf.unique(owners).y), tf.size(owners))",
        "distinct = tf.equal(tf.size(owners), tf.size(owners))",
        ("tests/training/test_user_level.py",),
        "one user's examples in two slots go unchecked",
    ),
    Mutation(
        "ledger_unit_unchecked",
        "keras_safe/privacy/ledger.py",
        "if held is not None and held != privacy_unit:",
        "if False:",
        ("tests/training/test_user_level.py",),
        "a ledger mixes example-level and user-level steps",
    ),
    # -- accounting (accounting/schedule.py, accountants.py) ------------------------------------
    Mutation(
        "sampling_rate_x0.95",
        "keras_safe/accounting/schedule.py",
        "return min(1.0, self.batch_size / self.num_examples)",
        "return min(1.0, 0.95 * self.batch_size / self.num_examples)",
        EPSILON,
        "the accountant charges 0.95 q",
    ),
    Mutation(
        "microbatch_factor_1",
        "keras_safe/accounting/schedule.py",
        "if m and (self.batch_size is None or m < self.batch_size):\n            return 2.0",
        "if m and (self.batch_size is None or m < self.batch_size):\n            return 1.0",
        EPSILON,
        "microbatches accounted at sensitivity C instead of 2 C",
    ),
    Mutation(
        "accounted_accumulation",
        "keras_safe/accounting/schedule.py",
        "noise_multiplier / (self.sensitivity_factor * math.sqrt(self.accumulation_steps))",
        "noise_multiplier / (self.sensitivity_factor * self.accumulation_steps**0.45)",
        EPSILON,
        "accumulated batches accounted with more noise than they draw",
    ),
    Mutation(
        "accountant_off_by_one",
        "keras_safe/accounting/accountants.py",
        "SelfComposedDpEvent(gaussian, int(steps))",
        "SelfComposedDpEvent(gaussian, int(steps) - 1)",
        EPSILON,
        "the accountant composes one step fewer",
    ),
    # -- DP statistics of the preprocessing layers (preprocessing/_dp_stats.py, _base.py) -----
    Mutation(
        "dp_stats_laplace_x0.8",
        "keras_safe/preprocessing/_dp_stats.py",
        "return float(rng.laplace(0.0, scale))",
        "return float(rng.laplace(0.0, 0.8 * scale))",
        DP_STATS,
        "every Laplace draw 20% too small",
    ),
    Mutation(
        "dp_count_scale_x0.95",
        "keras_safe/preprocessing/_dp_stats.py",
        "return n + laplace(1.0 / epsilon, rng)",
        "return n + laplace(0.95 / epsilon, rng)",
        DP_STATS,
        "noisy count 5% under-noised",
    ),
    Mutation(
        "dp_mean_sum_scale_x0.95",
        "keras_safe/preprocessing/_dp_stats.py",
        "laplace(half / (epsilon / 2.0), rng)",
        "laplace(0.95 * half / (epsilon / 2.0), rng)",
        DP_STATS,
        "noisy sum of dp_mean 5% under-noised",
    ),
    Mutation(
        "dp_mean_count_budget",
        "keras_safe/preprocessing/_dp_stats.py",
        "count = dp_count(values.size, epsilon / 2.0, rng)",
        "count = dp_count(values.size, epsilon, rng)",
        DP_STATS,
        "dp_mean's count spends the whole budget",
    ),
    Mutation(
        "dp_mean_std_squares_x0.95",
        "keras_safe/preprocessing/_dp_stats.py",
        "laplace(half**2 / eps, rng)",
        "laplace(0.95 * half**2 / eps, rng)",
        DP_STATS,
        "noisy sum of squares 5% under-noised",
    ),
    Mutation(
        "dp_mean_std_budget_split",
        "keras_safe/preprocessing/_dp_stats.py",
        "eps = epsilon / 3.0",
        "eps = epsilon / 2.85",
        DP_STATS,
        "dp_mean_std spends 5% more than its budget",
    ),
    Mutation(
        "dp_quantile_epsilon_x1.05",
        "keras_safe/preprocessing/_dp_stats.py",
        "log_w = np.log(lengths) - epsilon * np.abs(ranks - q * n) / 2.0",
        "log_w = np.log(lengths) - 1.05 * epsilon * np.abs(ranks - q * n) / 2.0",
        DP_STATS,
        "the exponential mechanism spends 5% more than its budget",
    ),
    Mutation(
        "layer_budget_split",
        "keras_safe/preprocessing/_base.py",
        "share = self.dp_epsilon / num_features",
        "share = 1.25 * self.dp_epsilon / num_features",
        DP_STATS,
        "a preprocessing layer spends 25% more than dp_epsilon",
    ),
    # -- the per-step enforcement of the two assumptions (training/, privacy/independence/) ---
    Mutation(
        "independence_check_off",
        "keras_safe/privacy/independence/__init__.py",
        "    if problems:\n        raise PrivacyError(",
        "    if False:\n        raise PrivacyError(",
        ENFORCEMENT,
        "a step whose examples mix (or whose forward pass writes state) trains",
    ),
    Mutation(
        "reduction_over_the_batch_kept",
        "keras_safe/privacy/independence/rules.py",
        'if v.axis in axes:\n        return _outputs(op, mixed(op, "reduces over the batch axis"))',
        'if False:\n        return _outputs(op, mixed(op, "reduces over the batch axis"))',
        INDEPENDENCE,
        "a reduction across the examples counts as row-wise",
    ),
    Mutation(
        "gather_across_the_batch_kept",
        "keras_safe/privacy/independence/layout.py",
        "        elif params.axis == axis:",
        "        elif False:",
        INDEPENDENCE,
        "a gather along the batch axis (MixUp's permutation) counts as row-wise",
    ),
    Mutation(
        "branch_of_a_cond_skipped",
        "keras_safe/privacy/independence/analysis.py",
        "        outs = found if outs is None else [join(a, b, op) for a, b in zip(outs, found)]",
        "        outs = found if outs is None else outs",
        INDEPENDENCE,
        "only the first branch of a tf.cond is analysed (mixing in the other slips through)",
    ),
    Mutation(
        "data_written_to_variables",
        "keras_safe/privacy/independence/analysis.py",
        "        if effect and (data or self.tainted or counted):",
        "        if effect and (self.tainted or counted):",
        ENFORCEMENT,
        "a forward pass may store the data in a variable",
    ),
    Mutation(
        "writes_under_data_chosen_control_flow",
        "keras_safe/privacy/independence/analysis.py",
        "        if effect and (data or self.tainted or counted):",
        "        if effect and (data or counted):",
        SIDE_EFFECTS,
        "constant writes in a loop or branch the data chose (the data in the trip count) pass",
    ),
    Mutation(
        "stateful_ops_other_than_writes_ignored",
        "keras_safe/privacy/independence/analysis.py",
        '    return f"the stateful op {op.type}" if stateful else ""',
        '    return ""',
        SIDE_EFFECTS,
        "hash tables, generators and prints fed by the data pass as pure ops",
    ),
    Mutation(
        "caller_batches_amplified",
        "keras_safe/training/state.py",
        'sampling = getattr(dp, "sampling", None) or "shuffle"',
        'sampling = getattr(dp, "sampling", None) or "poisson"',
        CALLER_BATCHES,
        "train_on_batch and custom-loop batches charged as Poisson samples nobody drew",
    ),
    Mutation(
        "caller_step_uses_epoch_grant",
        "keras_safe/privacy/ledger.py",
        "        if not in_epoch:\n            new_mechanism = tf.constant(True)",
        "        if False:\n            new_mechanism = tf.constant(True)",
        CALLER_BATCHES,
        "a caller's step after a shuffled epoch cut short rides on that epoch's one mechanism",
    ),
    Mutation(
        "negative_weights_not_counted",
        "keras_safe/training/train_step.py",
        "tf.cast(w, tf.float32), [size, -1]) != 0, axis=1)",
        "tf.cast(w, tf.float32), [size, -1]) > 0, axis=1)",
        CALLER_BATCHES,
        "rows of negative weight enter the sum but not the batch-size check",
    ),
    Mutation(
        "batch_size_value_public",
        "keras_safe/training/train_step.py",
        "    watch.check(model, losses, schedule.poisson and not padded)",
        "    watch.check(model, losses, False)",
        CALLER_BATCHES,
        "the number of rows of an unpadded Poisson batch may enter the examples' values",
    ),
    Mutation(
        "copies_into_trained_models_unseen",
        "keras_safe/training/ownership.py",
        "    if not others:  # weights copied in, before or after this model trained",
        "    if not others and own.steps == 0:",
        ("tests/training/test_ownership.py",),
        "weights copied into a model that already spent privacy keep its own ledger",
    ),
    Mutation(
        "batch_rows_unchecked",
        "keras_safe/training/train_step.py",
        "        limit = schedule.batch_size\n",
        "        limit = 100 * schedule.batch_size\n",
        ENFORCEMENT,
        "a step may hold far more examples than the accountant charges",
    ),
    Mutation(
        "microbatches_of_two_at_c",
        "keras_safe/training/train_step.py",
        "    if groups and schedule.sensitivity_factor == 1.0:",
        "    if False:",
        ENFORCEMENT,
        "microbatches of two examples accounted at sensitivity C",
    ),
    Mutation(
        "shared_weights_own_ledger",
        "keras_safe/training/ownership.py",
        "    others = {ledger for ledger in (_owner(v) for v in variables) if ledger is not own}",
        "    others = set()",
        OWNERSHIP,
        "two models training one layer each count only their own steps",
    ),
    Mutation(
        "dp_statistics_uncharged",
        "keras_safe/training/ownership.py",
        "                ledger.record_statistics(release, layer.dp_epsilon_spent)",
        "                pass",
        OWNERSHIP,
        "a DP preprocessing layer's epsilon is left out of the model's ledger",
    ),
    Mutation(
        "exact_statistics_accepted",
        "keras_safe/training/ownership.py",
        "            elif not int(layer.adapted_on_public_data.numpy()):",
        "            elif False:",
        OWNERSHIP,
        "exact statistics of the training data are released with the model",
    ),
    Mutation(
        "privatize_outside_the_step",
        "keras_safe/optimizers/dp.py",
        "        if not provenance.in_release():",
        "        if False:",
        ENFORCEMENT,
        "the optimizer's privatize noises and releases any gradients, nothing charged",
    ),
)


PROBE = '''\
"""Loaded by tests/mutations.py into every run: keras_safe must come from the scratch copy."""
import os

import pytest


def pytest_collection_finish(session):
    import keras_safe

    root = os.path.realpath(os.environ["KERAS_SAFE_MUTATION_ROOT"])
    path = os.path.realpath(keras_safe.__file__)
    with open(os.environ["KERAS_SAFE_MUTATION_PROBE"], "a") as out:
        out.write(path + "\\n")
    if not path.startswith(root + os.sep):
        raise pytest.UsageError(f"keras_safe was imported from {path}, not from {root}")
'''


def _copy_tree(scratch):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = os.path.join(REPO, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(scratch, name), ignore=ignore)
        elif os.path.exists(source):
            shutil.copy2(source, os.path.join(scratch, name))
    with open(os.path.join(scratch, "_mutation_probe.py"), "w") as out:
        out.write(PROBE)


def _pytest(scratch, targets, workers, stop_first, deselect=()):
    probe = os.path.join(scratch, "probe.txt")
    if os.path.exists(probe):
        os.remove(probe)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=scratch + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONDONTWRITEBYTECODE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_SAFE_MUTATION_ROOT=scratch,
        KERAS_SAFE_MUTATION_PROBE=probe,
    )
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "not slow"]
    command += ["-p", "no:cacheprovider", "-p", "_mutation_probe", "-W", "ignore"]
    if stop_first:
        command.append("-x")
    if workers > 1:
        command += ["-n", str(workers)]
    for node in deselect:
        command += ["--deselect", node]
    command += list(targets)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=scratch, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        rc, output = None, f"timed out after {TIMEOUT} s\n{error.stdout or ''}"
    seconds = time.perf_counter() - start
    imported = open(probe).read().split() if os.path.exists(probe) else []
    return rc, output, seconds, imported


def _failures(output):
    """The node ids pytest's short summary names as FAILED or ERROR."""
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    return list(dict.fromkeys(f for f in found if "::" in f or f.endswith(".py")))


def _short(node):
    """`tests/optimizers/test_dp.py::test_x` -> `test_dp.py::test_x`."""
    path, _, test = node.partition("::")
    return f"{os.path.basename(path)}::{test}" if test else os.path.basename(path)


def _tests_run(output):
    """How many tests ran, from pytest's last summary line."""
    lines = [line for line in output.strip().splitlines() if re.search(r" in [0-9.]+s", line)]
    counts = re.findall(r"(\d+) (?:passed|failed|errors?)\b", lines[-1]) if lines else []
    return sum(int(c) for c in counts)


def _isolated(scratch, imported):
    root = os.path.realpath(scratch) + os.sep
    return bool(imported) and all(path.startswith(root) for path in imported)


def _anchor_count(scratch, mutation):
    path = os.path.join(scratch, mutation.file)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return handle.read().count(mutation.old)


def _run_mutation(scratch, mutation, workers, deselect):
    count = _anchor_count(scratch, mutation)
    if count != 1:
        where = "file missing" if count is None else f"text found {count} times"
        return "ANCHOR-MISSING", where, 0.0, 0
    path = os.path.join(scratch, mutation.file)
    with open(path) as handle:
        original = handle.read()
    try:
        with open(path, "w") as handle:
            handle.write(original.replace(mutation.old, mutation.new))
        rc, output, seconds, imported = _pytest(
            scratch, mutation.tests, workers, stop_first=True, deselect=deselect
        )
    finally:
        with open(path, "w") as handle:
            handle.write(original)
    ran = _tests_run(output)
    if rc in (0, 1) and not _isolated(scratch, imported):
        return "ERROR", f"keras_safe imported from {imported or 'nowhere'}", seconds, ran
    if rc == 0:
        return "SURVIVED", "", seconds, ran
    if rc == 1:
        failed = _failures(output)
        return "CAUGHT", _short(failed[0]) if failed else "(a test failed)", seconds, ran
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    return "ERROR", f"pytest exit {rc}: {tail[-300:]}", seconds, ran


def _table(rows):
    headers = ("mutation", "result", "tests run", "seconds", "caught by / detail")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    widths[2] = min(widths[2], 60)
    widths[-1] = min(widths[-1], 100)

    def line(cells):
        return " | ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()

    print(line(headers))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="mutation name (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; known: {', '.join(names)}")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0

    scratch = tempfile.mkdtemp(prefix="keras_safe_mutations_")
    try:
        _copy_tree(scratch)
        print(f"scratch copy: {scratch}")
        deselect = []
        if not args.no_baseline:
            targets = list(dict.fromkeys(t for m in chosen for t in m.tests))
            rc, output, seconds, imported = _pytest(scratch, targets, args.workers, False)
            if not _isolated(scratch, imported):
                print(f"the baseline run imported keras_safe from {imported}: not isolated")
                print(output[-3000:])
                return 2
            print(f"keras_safe imported from {imported[0]}")
            if rc not in (0, 1):
                print(f"the baseline run could not run (pytest exit {rc}):\n{output[-3000:]}")
                return 2
            deselect = _failures(output)
            print(f"baseline: {len(targets)} test files, {seconds:.0f} s, exit {rc}")
            for node in deselect:
                print(f"  fails without any mutation, deselected: {node}")
        rows = []
        for mutation in chosen:
            result, detail, seconds, ran = _run_mutation(scratch, mutation, args.workers, deselect)
            files = ", ".join(os.path.basename(t.split("::")[0]) for t in mutation.tests)
            rows.append((mutation.name, result, f"{ran} of {files}", f"{seconds:.0f}", detail))
            print(f"{mutation.name}: {result} {detail} ({seconds:.0f} s)", flush=True)
        print()
        _table(rows)
        caught = sum(r[1] == "CAUGHT" for r in rows)
        print(f"\n{caught} of {len(rows)} mutations caught by the default (non-slow) tests")
        return 0 if caught == len(rows) else 1
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
