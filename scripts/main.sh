#!/usr/bin/env bash
# The main job: train an amortized posterior for the 2-level ragged Gaussian example, then compare
# it with NUTS on 10 held-out simulated datasets and print the table.
source "$(dirname "$0")/env.sh"
python experiments/main.py "$@"
