#!/usr/bin/env bash
# Launch training the torchtitan way; the same environment variables as torchtitan's
# run_train.sh, with our trainer as the default TRAIN_FILE:
#   NGPU=2 CONFIG_FILE=train_configs/llama3_debug.toml bash tools/run_train.sh [--section.key value ...]
#   NGPU=8 COMM_MODE=fake_backend CONFIG_FILE=... bash tools/run_train.sh   # dry run, one process
# NGPU = processes on this node (GPUs, or CPU processes with gloo on a CPU machine).
# torchtitan's own run_train.sh works too: TRAIN_FILE=diffusion_blocks.train ./run_train.sh
set -euo pipefail
NGPU=${NGPU:-1}
export LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-"train_configs/llama3_debug.toml"}
TRAIN_FILE=${TRAIN_FILE:-"diffusion_blocks.train"}
COMM_MODE=${COMM_MODE:-""}
if [ -n "$COMM_MODE" ]; then
    echo "Running with comm_mode=${COMM_MODE}"
    NGPU="${NGPU}" LOCAL_RANK=0 exec python3 -m "${TRAIN_FILE}" --job.config_file "${CONFIG_FILE}" "$@" \
        --comm.mode="${COMM_MODE}" --training.steps=1
fi
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-"expandable_segments:True"}
exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --local-ranks-filter "${LOG_RANK}" --role rank --tee 3 \
    -m "${TRAIN_FILE}" --job.config_file "${CONFIG_FILE}" "$@"
