#!/usr/bin/env bash
# torchrun on ONE node for examples/recipes/llama31_8b_sft.yaml (short-context SFT, 8K rows).
#
# The recipe is laid out for 256 GPUs (TP2 x DP128, examples/slurm/llama31_8b_sft.sbatch); on one
# 8-GPU node it is the same run with DP4 and 32 accumulated micro-batches per step of 128 rows.
#
#   examples/recipes/run_llama31_8b_sft.sh [section.field=value ...]
#   CPT=checkpoints/ultralong_4m CKPT=checkpoints/ultralong_4m_sft_node examples/recipes/run_llama31_8b_sft.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${WORK:-$PWD}"   # the recipe's paths are relative to $WORK (docs/training.md "Path layout")

CONFIG=$REPO/examples/recipes/llama31_8b_sft.yaml
NPROC=${NPROC:-8}
CPT=${CPT:-checkpoints/ultralong_1m}   # the CPT stage's save directory (its `latest`; YaRN RoPE included)
CKPT=${CKPT:-checkpoints/ultralong_sft_node}

export CUDA_DEVICE_MAX_CONNECTIONS=1
export TOKENIZERS_PARALLELISM=false

exec torchrun --standalone --nproc-per-node "$NPROC" "$REPO/tools/train.py" --config "$CONFIG" \
    model.megatron_checkpoint="$CPT" \
    train.save="$CKPT" train.load="$CKPT" "$@"
