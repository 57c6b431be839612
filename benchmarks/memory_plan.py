"""Per-GPU memory and step time of the recipes in examples/recipes/, printed from training/memory.py.

    python benchmarks/memory_plan.py            # every table quoted in docs/parallelism_plan.md

No formula lives here: the layouts come from the recipe YAMLs and the Slurm training template (nodes x 8
GPUs), the bytes from `megatron_ultralong.training.memory`. What this script adds are the
assumptions of a plan, stated once:
  - an 80 GB H100 (SXM, 989 dense bf16 TFLOP/s);
  - FRAMEWORK_GB for the CUDA context, NCCL buffers and allocator cache, not in the model;
  - a layout fits if model + framework <= USABLE_GB (the rest absorbs fragmentation);
  - step time at an assumed MFU range (model FLOPs / peak; measure it with benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_ultralong.model.config import PRESETS, LlamaConfig  # noqa: E402
from megatron_ultralong.training import memory as M  # noqa: E402
from megatron_ultralong.training import memory_fit as F  # noqa: E402
from megatron_ultralong.training import step_time as S  # noqa: E402
from megatron_ultralong.training.config import load_train_config  # noqa: E402
from megatron_ultralong.training.step_time import MFU_RANGE  # noqa: E402  (the dry run's too)

GB = 1e9
DEVICE_GB = 80.0
FRAMEWORK_GB = 5.0
USABLE_GB = 74.0
PEAK_TFLOPS = 989.0
RECIPES = ("llama31_8b_1m", "llama31_8b_2m", "llama31_8b_4m", "llama31_8b_1m_sft", "llama31_8b_2m_sft", "llama31_8b_4m_sft")
LADDER_NAMES = {("none", ()): "none", ("selective", ("layernorm",)): "selective[layernorm]",
                ("selective", ("layernorm", "mlp")): "selective[layernorm,mlp]", ("full", ()): "full"}


def slurm_world() -> int:
    """GPUs of the Slurm training template (examples/slurm/train.sbatch, every recipe): #SBATCH --nodes x 8."""
    with open(os.path.join(ROOT, "examples", "slurm", "train.sbatch"), encoding="utf-8") as f:
        return int(re.search(r"#SBATCH --nodes=(\d+)", f.read()).group(1)) * 8


def recipe(name: str):
    """(train config, layout on its Slurm world) of a recipe."""
    cfg = load_train_config(os.path.join(ROOT, "examples", "recipes", name + ".yaml"))
    return cfg, M.Layout.from_train_config(cfg, slurm_world())


def total_gb(model: LlamaConfig, lay: M.Layout) -> float:
    return M.estimate_layout(model, lay).total / GB + FRAMEWORK_GB


def mode_name(lay: M.Layout) -> str:
    return LADDER_NAMES.get((lay.recompute, tuple(lay.recompute_modules)), f"{lay.recompute}{list(lay.recompute_modules)}")


def best_recompute(model: LlamaConfig, lay: M.Layout):
    """The cheapest recompute that fits USABLE_GB (with the framework allowance), or None."""
    return F.choose_recompute(model, lay, (USABLE_GB - FRAMEWORK_GB) * GB)


def step_seconds(model: LlamaConfig, lay: M.Layout) -> tuple[float, float]:
    return tuple(S.estimate_layout_step_time(model, lay, PEAK_TFLOPS, mfu).seconds for mfu in MFU_RANGE)


def print_derivation(model: LlamaConfig) -> None:
    print("Saved bytes per token per layer, Llama-3.1-8B, bf16 (training/memory.py docstring):")
    for tp, sp in ((1, False), (8, True)):
        lay = M.Layout(seq_length=1 << 20, tp=tp, sequence_parallel=sp)
        row = [f"{LADDER_NAMES[(r, m)]} {M.activation_bytes_per_token_per_layer(model, replace(lay, recompute=r, recompute_modules=m)):,.0f}"
               for r, m in F.RECOMPUTE_LADDER]
        core = M.activation_bytes_per_token_per_layer(model, replace(lay, recompute="selective", recompute_modules=("core_attn",)))
        print(f"  TP{tp}{'+SP' if sp else ''}: " + ", ".join(row) + f", selective[core_attn] {core:,.0f}")
    parts = M.layer_saved_bytes(model, M.Layout(seq_length=1 << 20))
    print("  TP1 none by tensor: " + ", ".join(f"{k} {v:,.0f}" for k, v in parts.items()))


def print_recipe(name: str, model: LlamaConfig) -> None:
    cfg, lay = recipe(name)
    est = M.estimate_layout(model, lay)
    print(f"\n{name}: seq {lay.seq_length:,}  TP{lay.tp} x CP{lay.cp} x PP{lay.pp} x DP{lay.dp} = {lay.world_size} GPUs, "
          f"SP={lay.sequence_parallel}, cp_comm={lay.cp_comm_type}, recompute={mode_name(lay)}, "
          f"{lay.local_tokens:,} tokens/GPU")
    for key in est.DEVICE_FIELDS:
        print(f"  {key:<26} {getattr(est, key) / GB:8.2f} GB")
    print(f"  {'framework (assumed)':<26} {FRAMEWORK_GB:8.2f} GB")
    total = est.total / GB + FRAMEWORK_GB
    print(f"  {'total':<26} {total:8.2f} GB  ({'fits' if total <= USABLE_GB else 'DOES NOT FIT'} in {USABLE_GB:.0f} of {DEVICE_GB:.0f})")
    print(f"  recompute options (total GB, s/step at MFU {MFU_RANGE[0]:.2f} .. {MFU_RANGE[1]:.2f}):")
    for r, m in F.RECOMPUTE_LADDER:
        alt = replace(lay, recompute=r, recompute_modules=m)
        fast, slow = step_seconds(model, alt)
        print(f"    {LADDER_NAMES[(r, m)]:<26} {total_gb(model, alt):6.1f} GB  {fast:7.1f} .. {slow:7.1f} s")
    chosen = best_recompute(model, lay)
    print(f"  cheapest that fits: {mode_name(chosen) if chosen else 'none fits'}")
    if lay.seq_length >= 1 << 20:
        hours = [s * cfg.train.steps / 3600 for s in step_seconds(model, lay)]
        print(f"  {cfg.train.steps} steps: {hours[0]:.1f} .. {hours[1]:.1f} h on {lay.world_size} GPUs")


def scan(model: LlamaConfig) -> None:
    print(f"\nSmallest fitting replica per sequence length (cheapest recompute, SP when TP>1, p2p ring, DP=1):")
    for seq in (1 << 17, 1 << 20, 1 << 21, 1 << 22):
        best = None
        for tp in (1, 2, 4, 8):
            for cp in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                if seq % (2 * cp):
                    continue
                lay = best_recompute(model, M.Layout(seq_length=seq, tp=tp, cp=cp, sequence_parallel=tp > 1))
                if lay is not None:
                    if best is None or tp * cp < best.tp * best.cp:
                        best = lay
                    break
        if best is None:
            print(f"  seq {seq:>9,}: nothing up to TP8 x CP256 fits")
        else:
            print(f"  seq {seq:>9,}: TP{best.tp} x CP{best.cp} = {best.tp * best.cp:>3} GPUs, {mode_name(best)}, "
                  f"{total_gb(model, best):5.1f} GB")


ONE_NODE = (("llama31_8b_1m_8gpu", 80.0), ("llama31_8b_4m_8gpu_h100", 80.0), ("llama31_8b_4m_8gpu", 141.0))
"""The one-node recipes and their GPUs' memory (GB): 8 x H100 80GB (1M, 4M), 8 x H200 141GB (4M)."""
GPUS_PER_NODE = 8
ONE_NODE_LOSS_CHUNK = 4096
"""`train.loss_chunk_tokens` of the longest one-node plans: one chunk's fp32 logits, softmax and
gradient at TP 8 are 0.8 GB instead of 16K tokens' 3.3 GB (llama31_8b_4m_8gpu_h100.yaml)."""


def one_node_budget(device_gb: float) -> float:
    """Bytes the memory model may plan on one GPU of a one-node recipe: 90% of the device, less the
    framework allowance (the plan's rule for these recipes)."""
    return (0.9 * device_gb - FRAMEWORK_GB) * GB


def rung_name(lay: M.Layout) -> str:
    parts = [mode_name(lay)]
    parts += [f"mlp_tiles {lay.mlp_tiles}"] * (lay.mlp_tiles > 1)
    parts += [f"activation_offload {lay.activation_offload:g}"] * (lay.activation_offload > 0)
    parts += [f"optimizer offload {lay.optimizer_offload:g}"] * (lay.optimizer_offload > 0)
    return " + ".join(parts)


def one_node_recipe(name: str):
    """(train config, layout on one 8-GPU node) of a one-node recipe."""
    cfg = load_train_config(os.path.join(ROOT, "examples", "recipes", name + ".yaml"))
    return cfg, M.Layout.from_train_config(cfg, GPUS_PER_NODE)


def print_one_node(name: str, device_gb: float, model: LlamaConfig) -> None:
    cfg, lay = one_node_recipe(name)
    est = M.estimate_layout(model, lay)
    print(f"\n{name}: seq {lay.seq_length:,} on one node of 8 x {device_gb:.0f} GB, TP{lay.tp} x CP{lay.cp} x DP{lay.dp}, "
          f"{lay.seq_length // GPUS_PER_NODE:,} tokens/GPU, {rung_name(lay)}")
    for key in est.DEVICE_FIELDS:
        print(f"  {key:<26} {getattr(est, key) / GB:8.2f} GB")
    total = est.total / GB + FRAMEWORK_GB
    print(f"  {'total (+ framework)':<26} {total:8.2f} GB  = {100 * total / device_gb:.0f}% of {device_gb:.0f} GB")
    print(f"  host per GPU {est.host_total / GB:.1f} GB (activations {est.host_activations / GB:.1f}, optimizer "
          f"{est.host_optimizer / GB:.1f}); per node {GPUS_PER_NODE * est.host_total / GB:.0f} GB")
    chosen = F.choose_recompute(model, lay, one_node_budget(device_gb))
    print(f"  cheapest rung that fits 90%: {rung_name(chosen) if chosen else 'none fits'}")


def one_node_scan(model: LlamaConfig) -> None:
    print(f"\nLongest sequence on one 8-GPU node (TP8 x CP1, TE spec, {ONE_NODE_LOSS_CHUNK:,}-token loss chunks, "
          "cheapest rung within 90% incl. framework; estimate):")
    for device_gb in (80.0, 141.0):
        best = None
        for seq in range(1 << 19, (8 << 20) + 1, 1 << 18):
            lay = M.Layout(seq_length=seq, tp=8, sequence_parallel=True, transformer_engine=True, rope_fusion=True,
                           global_batch_size=2, loss_chunk_tokens=ONE_NODE_LOSS_CHUNK)
            chosen = F.choose_recompute(model, lay, one_node_budget(device_gb))
            if chosen is not None:
                best = (seq, chosen)
        if best is None:
            print(f"  {device_gb:.0f} GB: nothing from 512K fits")
            continue
        seq, chosen = best
        est = M.estimate_layout(model, chosen)
        print(f"  {device_gb:.0f} GB: {seq:,} tokens = {seq // GPUS_PER_NODE:,} per GPU, {rung_name(chosen)}, "
              f"{est.total / GB + FRAMEWORK_GB:.1f} GB/GPU, host {GPUS_PER_NODE * est.host_total / GB:.0f} GB/node")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    model = PRESETS["llama3.1-8b"]
    print(f"Llama-3.1-8B: {M.parameter_count(model):,} parameters; H100 {DEVICE_GB:.0f} GB, fit <= {USABLE_GB:.0f} GB "
          f"incl. {FRAMEWORK_GB:.0f} GB framework; time at {PEAK_TFLOPS:.0f} TFLOP/s x MFU {MFU_RANGE[0]} .. {MFU_RANGE[1]}")
    print_derivation(model)
    for name in RECIPES:
        print_recipe(name, model)
    scan(model)
    for name, device_gb in ONE_NODE:
        print_one_node(name, device_gb, model)
    one_node_scan(model)


if __name__ == "__main__":
    main()
