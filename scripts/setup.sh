#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned PyTorch and this package. Idempotent.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. quickstart, or dev (quickstart + test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-quickstart}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: the CPU machines here serve this exact build from local disk.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[${extras}]"
