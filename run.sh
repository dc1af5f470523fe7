#!/usr/bin/env bash
# The record run: check the arguments and the GPUs, fetch the 900M-token FineWeb subset if it is
# missing, check the data, then train with torchrun. The way to launch: a problem ends in one line,
# not inside torchrun's report of a failed child.
#   ./run.sh                                   8 GPUs, FineWeb (downloads data/fineweb10B first)
#   NPROC=4 ./run.sh                           4 GPUs (1, 2, 4 or 8: gradient accumulation fills the rest)
#   PYTHON=python3.12 ./run.sh                 another interpreter (default: python3)
#   ./run.sh --train_files 'other/*.bin' ...   arguments go to train_gpt.py; with --train_files no download
# Relative patterns and logs/ are the current folder's, as with python train_gpt.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-8}
case "$NPROC" in
  1|2|4|8) ;;
  *) echo "error: NPROC=$NPROC: train_gpt.py runs on 1, 2, 4 or 8 GPUs" >&2; exit 1 ;;
esac
# the arguments first: a typo must not wait for a 2 GB download
WORLD_SIZE="$NPROC" "$PYTHON" "$here/train_gpt.py" "$@" --check arguments > /dev/null
case " $* " in
  *" --check"*) ;;  # a check needs no GPU
  *) gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
     if [ "$gpus" -lt "$NPROC" ]; then
       echo "error: NPROC=$NPROC, but $gpus CUDA GPU(s) are in view (CUDA_VISIBLE_DEVICES): lower NPROC, or run on a machine with $NPROC" >&2
       exit 1
     fi ;;
esac
case " $* " in
  *" --train_files"* | *" --train-files"*) ;;  # the user's own data: nothing to fetch
  *) "$PYTHON" "$here/data/cached_fineweb10B.py" 9 ;;
esac
# the data, walked in one process: a problem is one line
WORLD_SIZE="$NPROC" "$PYTHON" "$here/train_gpt.py" "$@" --check > /dev/null
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$here/train_gpt.py" "$@"
