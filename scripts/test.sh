#!/usr/bin/env bash
# Set up and run the test suite. Tests that need ../shared/assets skip, saying so, when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export WORKBENCH_ASSETS="${WORKBENCH_ASSETS:-$(cd .. && pwd)/shared/assets}"
export WORKBENCH_NO_PROGRESS=1
# Lint (line length, pyflakes, import order) and the import graph (no cycle, no stage importing a stage) first:
# seconds, where the suite takes minutes.
.venv/bin/ruff check workbench tests benchmarks scripts
.venv/bin/python scripts/import_graph.py
.venv/bin/python -m pytest -q -rs "$@"
