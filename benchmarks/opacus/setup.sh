#!/usr/bin/env bash
# Creates benchmarks/opacus/.venv with PyTorch 2.13.0 (CPU build) and Opacus 1.6.0.
# Usage: bash benchmarks/opacus/setup.sh   (PYTHON=python3.11 to pick the interpreter;
# TORCH_SPEC=... to install torch from another requirement, e.g. a local CPU wheel's path)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
venv="$here/.venv"
vpy="$venv/bin/python"

if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))'; then
    echo "error: torch 2.13.0 and opacus 1.6.0 need Python 3.10 or newer, but $python is" \
        "$("$python" -c 'import platform; print(platform.python_version())')." \
        "Set PYTHON to such an interpreter, e.g. PYTHON=python3.11 bash $0" >&2
    exit 1
fi

"$python" -m venv "$venv"
"$vpy" -m pip install --upgrade pip

# torch first, alone: on Linux, PyPI's torch wheel is a CUDA build that pulls gigabytes of
# nvidia-* packages; a CPU build (torch 2.13.0+cpu) is picked where pip finds one.
"$vpy" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
torch_version="$("$vpy" -c 'import torch; print(torch.__version__)')"
if ! "$vpy" -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then
    echo "error: pip installed torch $torch_version, a CUDA build; this benchmark measures" \
        "the CPU. Remove $venv and rerun with a CPU build, e.g." \
        "TORCH_SPEC=/path/to/torch-2.13.0+cpu-...whl bash $0 or" \
        "PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index> bash $0" >&2
    exit 1
fi

# Then opacus, with torch held where it is: opacus 1.6.0 asks only for torch>=2.6.0.
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_version" >"$constraint"
"$vpy" -m pip install -c "$constraint" -r "$here/requirements.txt"

"$vpy" - "$torch_version" <<'PY'
import sys

import opacus
import torch

if torch.__version__ != sys.argv[1]:
    sys.exit(f"error: installing opacus changed torch from {sys.argv[1]} to {torch.__version__}.")
print("torch", torch.__version__, "(CUDA: none)", "opacus", opacus.__version__)
PY
echo "Run: $vpy $here/bench.py"
