#!/usr/bin/env bash
# The test suite (fast tests; long accuracy runs are behind `-m slow`).
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
