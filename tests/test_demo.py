"""The main command: `python -m keras_safe demo` and `--help`."""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the demo must keep TensorFlow quiet by itself
    return subprocess.run(
        [sys.executable, "-m", "keras_safe", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_help_lists_the_options():
    result = _run("demo", "--help")
    assert result.returncode == 0
    for option in ("--epochs", "--target-epsilon", "--output"):
        assert option in result.stdout


def test_demo_prints_the_table_and_writes_the_report(tmp_path):
    result = _run("demo", "--epochs", "8", "--target-epsilon", "2", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MIA AUC" in result.stdout and "DP-SGD" in result.stdout and "PGD acc" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    plain, private, robust = report["rows"]
    assert plain["epsilon"] is None and robust["epsilon"] is None
    assert 0 < private["epsilon"] <= 2.0 + 1e-6
    for row in (plain, private, robust):
        assert 0.0 <= row["mia_auc"] <= 1.0
        assert row["test_accuracy"] > 0.3  # 10 classes: far above guessing even after 8 epochs
        assert 0.0 <= row["pgd_accuracy"] <= row["test_accuracy"]
    assert (tmp_path / "roc.png").stat().st_size > 1000
    # The stored table is the printed one (the README quotes it from benchmarks/results/demo).
    assert "\n".join(report["table"]) in result.stdout
    assert report["seconds"] > 0
    # No TensorFlow or absl log lines (TensorFlow 2.21 writes them at import, whatever
    # TF_CPP_MIN_LOG_LEVEL says, unless the command line holds them back).
    log_line = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cuda", re.M | re.I)
    assert not log_line.search(result.stderr), result.stderr[-3000:]
    assert not log_line.search(result.stdout)
