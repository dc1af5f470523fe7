#!/usr/bin/env bash
# The record run: fetch the 900M-token FineWeb subset if it is missing, then train on 8 GPUs.
# Extra arguments go to train_gpt.py, e.g. ./run.sh --num_scheduled_iterations 150
set -euo pipefail
cd "$(dirname "$0")"
python data/cached_fineweb10B.py 9
torchrun --standalone --nproc_per_node="${NPROC:-8}" train_gpt.py "$@"
