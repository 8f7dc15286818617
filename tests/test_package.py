"""Package-level checks: public imports only, backend guard, version, nothing global."""

import json
import os
import pathlib
import re
import subprocess
import sys

import keras_safe

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRIVATE_IMPORT = re.compile(r"^\s*(from|import)\s+(keras\.src|tensorflow\.python)\b", re.M)


def _python_files():
    for folder in ("keras_safe", "tests", "benchmarks", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            if ".venv" not in path.parts:
                yield path


def test_no_private_keras_or_tensorflow_imports():
    offenders = [
        str(path.relative_to(ROOT))
        for path in _python_files()
        if PRIVATE_IMPORT.search(path.read_text())
    ]
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        if any(PRIVATE_IMPORT.search("".join(cell["source"])) for cell in cells):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"private Keras/TF imports in {offenders}"


def test_private_import_pattern_catches_offenders():
    assert PRIVATE_IMPORT.search("from keras.src.layers import Dense")
    assert PRIVATE_IMPORT.search("  import tensorflow.python.ops")
    assert not PRIVATE_IMPORT.search("from keras.layers import Dense")


def test_version_and_public_api():
    assert re.fullmatch(r"\d+\.\d+\.\d+", keras_safe.__version__)
    for name in ("privacy", "optimizers", "callbacks", "layers", "preprocessing", "audit"):
        assert hasattr(keras_safe, name)


def _run(code, **env):
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    full_env.pop("KERAS_BACKEND", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_import_with_backend_unset_sets_nothing_global():
    code = (
        "import keras, tensorflow as tf\n"
        "before = (keras.config.floatx(), keras.config.image_data_format(),"
        " keras.mixed_precision.dtype_policy().name, tf.config.functions_run_eagerly())\n"
        "import keras_safe\n"
        "after = (keras.config.floatx(), keras.config.image_data_format(),"
        " keras.mixed_precision.dtype_policy().name, tf.config.functions_run_eagerly())\n"
        "assert before == after, (before, after)\n"
        "print('OK', keras.backend.backend())\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK tensorflow" in result.stdout


def test_other_backend_raises_import_error_naming_the_fix():
    # Other backends need packages (jax, torch) that are not installed here, so the test makes
    # Keras report another backend before keras_safe is imported.
    result = _run("import keras\nkeras.backend.backend = lambda: 'jax'\nimport keras_safe")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "KERAS_BACKEND=tensorflow" in result.stderr
