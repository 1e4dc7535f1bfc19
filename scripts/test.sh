#!/usr/bin/env bash
# Set up .venv (first run only) with weighttracker, its test extras, contrib_timm,
# contrib_transformers and the example plugin package, check the import contracts, then run
# the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k plans -x`). Slow tests run here;
# a bare `pytest` skips them (see tests/conftest.py).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
.venv/bin/python -m pip install --quiet -e ".[test]" -e ./contrib_timm -e "./contrib_transformers[trainer]" -e ./tests/example_plugin
.venv/bin/lint-imports
.venv/bin/python -m pytest --run-slow "$@"
