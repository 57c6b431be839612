#!/usr/bin/env bash
# torchrun on ONE node for examples/recipes/llama31_8b_sft.yaml (short-context SFT, 8K rows).
#
# The recipe is laid out for 256 GPUs (TP2 x DP128, examples/slurm/llama31_8b_sft.sbatch); on one
# 8-GPU node it is the same run with DP4 and 32 accumulated micro-batches per step of 128 rows.
#
#   examples/recipes/run_llama31_8b_sft.sh [section.field=value ...]
#   CPT=checkpoints/ultralong_4m/iter_0000150/model TARGET=4194304 examples/recipes/run_llama31_8b_sft.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIG=examples/recipes/llama31_8b_sft.yaml
NPROC=${NPROC:-8}
CPT=${CPT:-checkpoints/ultralong_1m/iter_0000480/model}   # weights of the CPT stage
TARGET=${TARGET:-1048576}                                 # its YaRN target length (1M / 2M / 4M)
CKPT=${CKPT:-checkpoints/ultralong_sft_node}

export CUDA_DEVICE_MAX_CONNECTIONS=1
export TOKENIZERS_PARALLELISM=false

exec torchrun --standalone --nproc-per-node "$NPROC" tools/train.py --config "$CONFIG" \
    model.megatron_checkpoint="$CPT" model.yarn_target_length="$TARGET" \
    train.save="$CKPT" train.load="$CKPT" "$@"
