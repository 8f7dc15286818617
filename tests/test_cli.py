"""The command line starts fast and quietly: `--help` and `epsilon` never import TensorFlow."""

import importlib.util
import os
import pathlib
import re
import resource
import subprocess
import sys
import time

import pytest

from keras_safe import cli
from tests import dp_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
MNIST = ["--num-examples", "60000", "--batch-size", "256", "--epochs", "60",
         "--noise-multiplier", "1.1", "--delta", "1e-5"]  # fmt: skip
LIMIT_S = 2.0  # the whole process, on 2 cores: TensorFlow's import alone takes 4-5 s


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command line must be quiet on its own
    env.update(extra)
    return env


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _python(*args, tmp_path):
    """Runs Python in a subprocess: the result, its wall time and its CPU time in seconds."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    return result, time.perf_counter() - start, _cpu_seconds() - cpu


# Runs the command line in-process, then reports what it imported.
PROBE = """
import sys
from keras_safe import cli
try:
    status = cli.main(sys.argv[1:])
except SystemExit as exit:
    status = exit.code
heavy = sorted(name for name in ("tensorflow", "keras", "jax", "torch") if name in sys.modules)
print("HEAVY", heavy, "STATUS", status)
"""


@pytest.mark.parametrize("args", [["--help"], ["epsilon", "--help"], ["epsilon", *MNIST]])
def test_cli_imports_no_tensorflow(args, tmp_path):
    result, *_ = _python("-c", PROBE, *args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY [] STATUS 0" in result.stdout, result.stdout[-500:]
    assert result.stderr == ""


def test_probe_sees_tensorflow_when_it_is_imported(tmp_path):
    """The probe above can fail: a command that imports TensorFlow shows up in its list."""
    code = PROBE.replace(
        "from keras_safe import cli", "import keras_safe.layers\nfrom keras_safe import cli"
    )
    result, *_ = _python("-c", code, "--help", tmp_path=tmp_path)
    assert "'tensorflow'" in result.stdout and "'keras'" in result.stdout


@pytest.mark.parametrize(
    "args",
    [["--help"], ["epsilon", *MNIST]],
    ids=["help", "epsilon"],
)
def test_cli_answers_within_two_seconds_without_log_lines(args, tmp_path):
    # CPU time (user + system) of the whole process, the best of three: the machine is shared
    # with other work, which stretches wall time but not the time the command itself needs.
    runs = [_python("-m", "keras_safe", *args, tmp_path=tmp_path) for _ in range(3)]
    for result, *_ in runs:
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr == ""
    cpu = min(cpu for *_, cpu in runs)
    wall = min(wall for _, wall, _ in runs)
    assert cpu < LIMIT_S, f"python -m keras_safe {' '.join(args)}: {cpu:.2f} s CPU, {wall:.2f} s"
    if args[0] == "epsilon":
        first = runs[0][0].stdout.splitlines()[0]
        steps = int(re.search(r"(\d+) steps at sampling rate", first).group(1))
        assert 14062 <= steps <= 14100, first  # 60 epochs of 60000 / 256 steps
        reference = dp_reference.epsilon(1.1, 256 / 60000, steps, 1e-5)
        assert first.startswith(f"epsilon = {reference:.3f} "), first


def test_version_comes_from_the_one_place(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "keras_safe._version.__version__"
    }
    namespace = {}
    exec((ROOT / "keras_safe" / "_version.py").read_text(), namespace)
    result, *_ = _python("-m", "keras_safe", "--version", tmp_path=tmp_path)
    assert result.stdout.strip() == f"keras_safe {namespace['__version__']}"


def test_demo_help_counts_three_models(tmp_path):
    result, *_ = _python("-m", "keras_safe", "demo", "--help", tmp_path=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "three times: plainly, with DP-SGD and with PGD adversarial training" in text
    assert "twice" not in text


# What TensorFlow 2.21 writes to standard error while it is imported, before its logging is set up.
TF_START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796606689.488043   20794 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1796606689.488344   20794 cudart_stub.cc:31] Could not find cuda drivers.
W0000 00:00:1796606689.48     20794 gpu_device.cc:2342] Cannot dlopen some GPU libraries.
E0000 00:00:1796606689.48     20794 cuda_dnn.cc:8310] Unable to register cuDNN factory
I0000 00:00:1796606689.488344   20794 cpu_feature_guard.cc:227] This TensorFlow binary is optimized
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow.
"""


def test_start_up_filter_keeps_what_is_not_noise():
    lines = TF_START_UP.splitlines(keepends=True)
    kept = [line for line in lines if not cli._is_noise(line, 3)]
    assert kept == []
    kept = [line for line in lines if not cli._is_noise(line, 2)]
    assert [line[:5] for line in kept] == ["E0000"]
    assert not any(cli._is_noise(line, 0) for line in lines)  # TF_CPP_MIN_LOG_LEVEL=0: all
    for line in ("F0000 00:00:1.5   1 x.cc:1] fatal\n", "Traceback (most recent call last):\n",
                 "UserWarning: something real\n"):  # fmt: skip
        assert not cli._is_noise(line, 3)


def test_quiet_start_holds_back_start_up_lines_and_passes_the_rest(tmp_path):
    """Lines written to file descriptor 2 inside the block: log noise dropped, the rest kept."""
    code = (
        "import os, sys\n"
        "from keras_safe.cli import quiet_tensorflow_start\n"
        f"noise = {TF_START_UP!r}\n"
        "with quiet_tensorflow_start():\n"
        "    os.write(2, noise.encode())\n"
        "    os.write(2, b'a real problem\\n')\n"
        "    print('to stdout')\n"
        "print('level', os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
    )
    result, *_ = _python("-c", code, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "a real problem\n"
    assert result.stdout == "to stdout\nlevel 3\n"


def test_lora_example_help_shows_the_defaults(capsys):
    spec = importlib.util.spec_from_file_location(
        "dp_lora_keras_hub", ROOT / "examples" / "dp_lora_keras_hub.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = {"--records": 2048, "--epochs": 3, "--batch-size": 64, "--epsilon": 8.0,
                "--rank": 4, "--pretrain-epochs": 4}  # fmt: skip
    for option, default in defaults.items():
        assert re.search(rf"{option} \S+ .*?\(default: {default}\)", text), option
