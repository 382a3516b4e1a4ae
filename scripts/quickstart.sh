#!/usr/bin/env bash
# Set up and run the main job: EfficientNet-Lite0 to INT8, fully offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh quickstart
.venv/bin/workbench run recipes/quickstart.yaml "$@"
