#!/usr/bin/env bash
# Set up .venv (first run only) with weighttracker and run the demo: a small CNN with random
# weights trained briefly with group lasso, pruned, and compared before/after.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
.venv/bin/python -m pip install --quiet -e .
.venv/bin/weighttracker demo "$@"
