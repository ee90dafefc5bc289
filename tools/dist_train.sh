#!/usr/bin/env bash
# Multi-GPU training with torchrun (one process per GPU, DistributedDataParallel):
#   tools/dist_train.sh CONFIG NGPUS [train.py options...]
#   e.g. tools/dist_train.sh configs/gfl_r50.py 8 --amp
# The lr in the configs is for 16 images per step (8 GPUs x 2); with another total batch add
# --auto-scale-lr. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) in the environment.
# The interpreter: $PYTHON if set (e.g. PYTHON=/path/to/venv/bin/python), else the python3 (or
# python) first on PATH -- torchrun starts every worker with the interpreter that runs it.
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG NGPUS [tools/train.py options]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
if ! "$PYTHON" -c 'import gfl_det, torch' 2>/dev/null; then
    echo "error: $PYTHON cannot import gfl_det and torch; set PYTHON to the interpreter of the" \
         "environment where gfl_det is installed (e.g. PYTHON=/path/to/venv/bin/python $0 ...)" >&2
    exit 2
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    tools/train.py "$CONFIG" --launcher pytorch "$@"
