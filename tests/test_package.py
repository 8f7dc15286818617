"""Package-level checks: public imports only, backend guard, version, nothing global."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

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


def test_import_keras_safe_loads_neither_keras_nor_tensorflow():
    code = (
        "import sys, keras_safe\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "keras_safe.accounting.compute_epsilon\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
        "print(sorted(set(keras_safe.__all__) - set(dir(keras_safe))))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


# Each way of reaching a Keras-using subpackage after `import keras_safe` (which loads no Keras).
LAZY_IMPORTS = [
    "import keras_safe; keras_safe.optimizers",
    "from keras_safe import privacy",
    "import keras_safe.layers",
    "import keras_safe.training.train_step",
    "from keras_safe.preprocessing import Imputer",
    "from keras_safe import *",
]


# Runs each statement in turn (one process: TensorFlow starts once) and prints what it raised.
LAZY_PROBE = """
import keras_safe
import keras
{patch}
for statement in {statements!r}:
    try:
        exec(statement, {{}})
        print("OK", statement)
    except ImportError as error:
        print("REFUSED" if "KERAS_BACKEND=tensorflow" in str(error) else "OTHER", statement)
"""


def test_other_backend_is_refused_on_the_lazy_paths():
    patch = "keras.backend.backend = lambda: 'jax'"
    result = _run(LAZY_PROBE.format(patch=patch, statements=LAZY_IMPORTS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"REFUSED {s}" for s in LAZY_IMPORTS]


def test_lazy_paths_load_the_subpackages():
    result = _run(LAZY_PROBE.format(patch="", statements=LAZY_IMPORTS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [f"OK {s}" for s in LAZY_IMPORTS]


def test_accounting_needs_no_keras_on_any_backend():
    code = (
        "import sys\n"
        "sys.modules['keras'] = None  # any import of Keras fails\n"
        "from keras_safe.accounting import compute_epsilon\n"
        "from keras_safe import cli\n"
        "print(compute_epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=100, delta=1e-5))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0 < float(result.stdout) < 10


# After this, every serializable class of keras_safe must be registered with Keras.
REGISTERED = (
    "import keras\n"
    "names = ['keras_safe>SafeSequential', 'keras_safe>SafeFunctional', 'keras_safe>DPSGD',\n"
    "         'keras_safe>GradientClip', 'keras_safe>WeightNoise', 'keras_safe>PrivacyBudget']\n"
    "found = [keras.saving.get_registered_object(name) for name in names]\n"
    "assert all(found), dict(zip(names, found))\n"
    "import keras_safe.training.private_model as pm\n"
    "assert found[0] is pm.SafeSequential  # one class: no subpackage ran twice\n"
    "print('REGISTERED')\n"
)


@pytest.mark.parametrize(
    "first",
    [
        "import keras\nimport keras_safe\n",  # Keras first: keras_safe loads everything at once
        "import keras_safe\nfrom keras_safe.layers import WeightNoise\n",  # first Keras part
        "import keras_safe.training.train_step\n",  # a module deep down, keras_safe not loaded
    ],
    ids=["keras_first", "first_subpackage", "deep_module"],
)
def test_serializable_classes_are_registered_once_keras_is_in_use(first):
    result = _run(first + REGISTERED)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REGISTERED" in result.stdout


def test_registration_check_can_fail():
    """Before any Keras part of keras_safe is used, nothing of it is registered."""
    result = _run("import keras_safe\n" + REGISTERED)
    assert result.returncode != 0 and "AssertionError" in result.stderr
