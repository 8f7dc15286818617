#!/usr/bin/env bash
# Creates benchmarks/legacy/.venv with TensorFlow 2.15.1 and TensorFlow Privacy 0.9.0.
# Usage: bash benchmarks/legacy/setup.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 11)))'; then
    echo "error: tensorflow-privacy 0.9.0 needs Python 3.9-3.11, but $python is" \
        "$("$python" -c 'import platform; print(platform.python_version())')." \
        "Set PYTHON to such an interpreter, e.g. PYTHON=python3.11 bash $0" >&2
    exit 1
fi

"$python" -m venv "$here/.venv"
"$here/.venv/bin/python" -m pip install --upgrade pip
"$here/.venv/bin/python" -m pip install -r "$here/requirements.txt"
"$here/.venv/bin/python" -c 'import tensorflow as tf, tensorflow_privacy as tfp; print("tensorflow", tf.__version__, "tensorflow-privacy", tfp.__version__)'
echo "Run: $here/.venv/bin/python $here/tf_privacy_cnn.py"
