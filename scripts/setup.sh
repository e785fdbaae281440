#!/usr/bin/env bash
# Install what a fresh machine lacks: PyTorch (the CPU-capable wheel pinned for this project), mct and its tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -q -e ".[dev]"
# DVC needs a git repository and its own folder; both exist in a clone of this repo.
