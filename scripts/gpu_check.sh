#!/usr/bin/env bash
# GPU extractor check for a CUDA machine with no internet (default steps: meant to take under 5 minutes on an H100):
#   bash scripts/gpu_check.sh [gpu_check.py options]   (e.g. --photos DIR --weights PTH --out DIR)
# Uses the machine's python3 when it already has torch, torchvision, h5py, typer, rich and scikit-learn (GPU images
# usually do; nothing is installed then); otherwise installs the project into .venv from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if ! $PY -c "import torch, torchvision, h5py, typer, rich, sklearn" 2>/dev/null; then
    [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/python -m pip install --quiet -e .; }
    PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
df -h /dev/shm || true  # the readers hand batches over in shared memory (hybrid: ~90 MB per 256 decoded images)
exec $PY scripts/gpu_check.py "$@"
