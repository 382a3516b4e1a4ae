#!/usr/bin/env bash
# Set up and run the test suite. Tests that need ../shared/assets skip, saying so, when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export WORKBENCH_ASSETS="${WORKBENCH_ASSETS:-$(cd .. && pwd)/shared/assets}"
export WORKBENCH_NO_PROGRESS=1
# report.html is checked in headless Chromium (Debian's package); where it cannot be installed, that test skips
# and says why.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  { timeout 900 $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
    || { timeout 300 $SUDO apt-get update -q >/dev/null 2>&1 \
         && timeout 900 $SUDO apt-get install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "note: could not install chromium (apt-get); the report.html browser test will skip"
fi
# Lint (line length, pyflakes, import order) and the import graph (no cycle, no stage importing a stage) first:
# seconds, where the suite takes minutes.
.venv/bin/ruff check workbench tests benchmarks scripts
.venv/bin/python scripts/import_graph.py
.venv/bin/python -m pytest -q -rs "$@"
