#!/usr/bin/env bash
# Set up .venv (first run only) with weighttracker, its test extras, contrib_timm and the
# example plugin package, check the import contracts, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k plans -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[test]" -e ./contrib_timm -e ./tests/example_plugin
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
