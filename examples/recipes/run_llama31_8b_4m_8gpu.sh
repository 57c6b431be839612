#!/usr/bin/env bash
# torchrun on ONE 8-GPU node for examples/recipes/llama31_8b_4m_8gpu.yaml (the whole recipe, not a smoke test).
#
# Check the plan first (memory per GPU and host memory per node, from training/memory.py):
#   mu-train --config examples/recipes/llama31_8b_4m_8gpu.yaml --dry-run --world-size 8 --device-memory-gib 141 --host-memory-gib 2048
#
#   examples/recipes/run_llama31_8b_4m_8gpu.sh [section.field=value ...]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${WORK:-$PWD}"   # the recipe's paths are relative to $WORK (docs/training.md "Path layout")

# Megatron-Core overlaps TP communication with compute only if kernels queue in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TOKENIZERS_PARALLELISM=false
# Tiles and the offload allocate many variable-size blocks: let the allocator grow segments.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

exec torchrun --standalone --nproc-per-node 8 "$REPO/tools/train.py" \
    --config "$REPO/examples/recipes/llama31_8b_4m_8gpu.yaml" "$@"
