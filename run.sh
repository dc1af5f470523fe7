#!/usr/bin/env bash
# The record run: fetch the 900M-token FineWeb subset if it is missing, then train with torchrun.
#   ./run.sh                                   8 GPUs, FineWeb (downloads data/fineweb10B first)
#   NPROC=4 ./run.sh                           4 GPUs (1, 2, 4 or 8: gradient accumulation fills the rest)
#   PYTHON=python3.12 ./run.sh                 another interpreter (default: python3)
#   ./run.sh --train_files 'other/*.bin' ...   arguments go to train_gpt.py; with --train_files no download
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
case " $* " in
  *" --train_files"*) ;;  # the user's own data: nothing to fetch
  *) "$PYTHON" data/cached_fineweb10B.py 9 ;;
esac
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-8}" train_gpt.py "$@"
