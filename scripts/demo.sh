#!/usr/bin/env bash
# Set up .venv (first run only) with weighttracker and run the demo: a small CNN with random
# weights trained briefly with group lasso, pruned, and compared before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e .
.venv/bin/weighttracker demo "$@"
