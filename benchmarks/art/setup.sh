#!/usr/bin/env bash
# Creates benchmarks/art/.venv with TensorFlow, the Adversarial Robustness Toolbox and keras_safe.
# Usage: bash benchmarks/art/setup.sh   (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"

"$python" -m venv "$here/.venv"
"$here/.venv/bin/python" -m pip install --upgrade pip
"$here/.venv/bin/python" -m pip install -r "$here/requirements.txt"
"$here/.venv/bin/python" -m pip install -e "$root"
"$here/.venv/bin/python" -c 'import art, keras, tensorflow as tf; print("tensorflow", tf.__version__, "keras", keras.__version__, "art", art.__version__)'
echo "Run: $here/.venv/bin/python $here/art_pgd.py"
