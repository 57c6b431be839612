#!/usr/bin/env bash
# torchrun on ONE node for any recipe in this directory: RECIPE= chooses it (a name here, or a path
# to a YAML file); default llama31_8b_1m.
#
# The CPT recipes are laid out for 256 GPUs (examples/slurm/train.sbatch; at least 16 / 32 / 64 H100s
# for 1M / 2M / 4M, docs/parallelism_plan.md §3). One 8-GPU node runs the same recipe -- model, YaRN
# factor, optimizer, data, checkpoints -- as a smoke test at SEQ tokens per sequence (default
# 131,072, TP8 x CP1, ~52 GB per GPU with the recipes' selective recompute). The full lengths need
# more nodes (Slurm).
# The one-node recipes (llama31_8b_1m_8gpu and llama31_8b_4m_8gpu_h100 on 8 x H100 80GB,
# llama31_8b_4m_8gpu on 8 x H200) run whole,
# as laid out, into their own save directories; check their plan first (device memory per GPU and
# host memory per node): mu-train --config examples/recipes/llama31_8b_1m_8gpu.yaml --dry-run --world-size 8
# The SFT recipes (llama31_8b_{1m,2m,4m}_sft) run as laid out (TP2), with DP4 and 32 accumulated
# micro-batches per step of 128 rows.
# Saves go to CKPT (default checkpoints/<recipe>_node), not to the recipe's save directory, so a
# smoke test never becomes the next step's input; a rerun continues from CKPT's last checkpoint.
#
#   RECIPE=llama31_8b_1m_8gpu examples/recipes/run_node.sh
#   RECIPE=llama31_8b_4m examples/recipes/run_node.sh [section.field=value ...]
#   RECIPE=llama31_8b_1m_sft NPROC=8 examples/recipes/run_node.sh
#   NPROC=8 TP=8 SEQ=131072 CKPT=checkpoints/ultralong_1m_node examples/recipes/run_node.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "${WORK:-$PWD}"   # the recipe's paths are relative to $WORK (docs/training.md "Path layout")

RECIPE=${RECIPE:-llama31_8b_1m}
case "$RECIPE" in
  */* | *.yaml) CONFIG=$RECIPE ;;
  *) CONFIG=$REPO/examples/recipes/$RECIPE.yaml ;;
esac
NAME=$(basename "$CONFIG" .yaml)
NPROC=${NPROC:-8}
CKPT=${CKPT:-checkpoints/${NAME}_node}
ARGS=(train.save="$CKPT" train.load="$CKPT")
case "$NAME" in
  *_8gpu | *_8gpu_*) ARGS=() ;;  # laid out for one node: the whole recipe, its own save directory
  *_sft) ;;
  *)
    TP=${TP:-8}
    CP=${CP:-$((NPROC / TP))}
    SEQ=${SEQ:-131072}
    ARGS+=(data.seq_length="$SEQ" parallel.tensor_parallel="$TP" parallel.context_parallel="$CP") ;;
esac

# Megatron-Core overlaps TP/CP communication with compute only if kernels queue in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TOKENIZERS_PARALLELISM=false
# Expandable segments avoid the fragmentation that long activations of changing sizes leave behind.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

exec torchrun --standalone --nproc-per-node "$NPROC" "$REPO/tools/train.py" --config "$CONFIG" "${ARGS[@]}" "$@"
