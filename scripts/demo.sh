#!/usr/bin/env bash
# Set up .venv (first run only) with weighttracker and the demo's extra (scikit-learn, whose
# wheel ships the handwritten-digits data set), then run the demo: a small CNN trained on the
# digits, then with group lasso, pruned, and compared before/after (test accuracy, latency).
# Extra arguments go to `weighttracker demo` (e.g. `bash scripts/demo.sh --strength 0.05`).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
.venv/bin/python -m pip install --quiet -e ".[demo]"
.venv/bin/weighttracker demo "$@"
