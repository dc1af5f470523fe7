#!/usr/bin/env bash
# The record run: fetch the 900M-token FineWeb subset if it is missing, then train with torchrun.
#   ./run.sh                                   8 GPUs, FineWeb (downloads data/fineweb10B first)
#   NPROC=4 ./run.sh                           4 GPUs (1, 2, 4 or 8: gradient accumulation fills the rest)
#   PYTHON=python3.12 ./run.sh                 another interpreter (default: python3)
#   ./run.sh --train_files 'other/*.bin' ...   arguments go to train_gpt.py; with --train_files no download
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-8}
case "$NPROC" in
  1|2|4|8) ;;
  *) echo "error: NPROC=$NPROC: train_gpt.py runs on 1, 2, 4 or 8 GPUs" >&2; exit 1 ;;
esac
case " $* " in
  *" --train_files"*) ;;  # the user's own data: nothing to fetch
  *) "$PYTHON" data/cached_fineweb10B.py 9 ;;
esac
# The arguments and the data, checked in one process first: a problem is then one line, not under
# torchrun's report of a failed child.
WORLD_SIZE="$NPROC" "$PYTHON" train_gpt.py "$@" --check > /dev/null
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
