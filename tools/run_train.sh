#!/usr/bin/env bash
# Launch DiffusionBlocks training the torchtitan way.
#   NGPU=2 CONFIG_FILE=train_configs/llama3_debug.toml bash tools/run_train.sh [--section.key value ...]
# NGPU = processes on this node (GPUs, or CPU processes with gloo on a CPU machine).
set -euo pipefail
NGPU=${NGPU:-1}
CONFIG_FILE=${CONFIG_FILE:-"train_configs/llama3_debug.toml"}
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-"expandable_segments:True"}
exec torchrun --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
    -m diffusion_blocks.train --job.config_file "${CONFIG_FILE}" "$@"
