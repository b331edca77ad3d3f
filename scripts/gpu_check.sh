#!/usr/bin/env bash
# GPU extractor check for a CUDA machine with no internet, in under 5 minutes:
#   bash scripts/gpu_check.sh [N_IMAGES] [BATCH]
# Installs the project into .venv if needed (from the package registry), then runs scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet -e .
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
.venv/bin/python scripts/gpu_check.py "${1:-4000}" "${2:-256}"
