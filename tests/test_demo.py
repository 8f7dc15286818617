"""The main command: `python -m keras_safe demo` and `--help`."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
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
