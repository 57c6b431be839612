#!/usr/bin/env bash
# torchrun on ONE node for examples/recipes/llama31_8b_4m.yaml.
#
# The full 4M recipe needs at least 64 H100s (TP4 x CP16, docs/parallelism_plan.md §3) and is laid
# out for 256 (examples/slurm/llama31_8b_4m.sbatch). One 8-GPU node runs the same recipe -- model,
# YaRN factor 512, optimizer, data, checkpoints -- as a smoke test at SEQ tokens per sequence
# (default 131,072, TP8 x CP1, ~52 GB per GPU with the recipe's selective recompute). SEQ=4194304 needs >= 8 nodes.
#
#   examples/recipes/run_llama31_8b_4m.sh [section.field=value ...]
#   NPROC=8 TP=8 SEQ=131072 CKPT=checkpoints/ultralong_4m_node examples/recipes/run_llama31_8b_4m.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${WORK:-$PWD}"   # the recipe's paths are relative to $WORK (docs/training.md "Path layout")

CONFIG=$REPO/examples/recipes/llama31_8b_4m.yaml
NPROC=${NPROC:-8}
TP=${TP:-8}
CP=${CP:-$((NPROC / TP))}
SEQ=${SEQ:-131072}
CKPT=${CKPT:-checkpoints/ultralong_4m_node}

# Megatron-Core overlaps TP/CP communication with compute only if kernels queue in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TOKENIZERS_PARALLELISM=false

# train.load = train.save: a rerun continues from the last complete checkpoint (none yet: fresh start).
exec torchrun --standalone --nproc-per-node "$NPROC" "$REPO/tools/train.py" --config "$CONFIG" \
    data.seq_length="$SEQ" parallel.tensor_parallel="$TP" parallel.context_parallel="$CP" \
    train.save="$CKPT" train.load="$CKPT" "$@"
