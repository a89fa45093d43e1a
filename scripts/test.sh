#!/usr/bin/env bash
# The test suite (fast tests; long accuracy runs are behind `-m slow`).
AMORTIZE_EXTRAS=test,bench source "$(dirname "$0")/env.sh"  # bench: the NumPyro twins (experiments/bench) are tested too
python -m pytest -q "$@"
