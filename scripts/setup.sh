#!/usr/bin/env bash
# Create .venv and install c2seg with everything it needs, pinned by constraints.txt (torch CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_CONSTRAINT="$PWD/constraints.txt"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/c2seg --help >/dev/null
echo "c2seg installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
