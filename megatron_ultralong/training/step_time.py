"""The step-time prediction every planner prints: a FLOPs model at one MFU range.

`estimate_step_time` is the formula (model FLOPs of training/metrics.py plus the forward FLOPs the
recompute and tiling settings of a training/memory.py `Layout` re-run, at peak x MFU); `MFU_RANGE`
is the one assumption that turns it into a plan, so `mu-train --dry-run` and benchmarks/memory_plan.py (which
prints docs/parallelism_plan.md's tables) quote the same seconds per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.training.memory import Layout, resolve_model_config, resolved_mlp_tiles
from megatron_ultralong.training.metrics import training_flops_per_token

@dataclass(frozen=True)
class StepTimeEstimate:
    """Predicted time of one optimizer step from FLOPs at an assumed MFU."""

    model_flops_per_token: float
    """6 N_matmul + 6 L d s (training/metrics.py): what MFU counts."""
    recompute_flops_per_token: float
    """Extra forward work of the recompute setting (not counted in MFU)."""
    tokens_per_step: int
    seconds: float
    tokens_per_second_per_gpu: float


def recompute_flops_per_token(cfg: LlamaConfig, lay: Layout) -> float:
    """Forward FLOPs re-run per token: whole layers (full), the MLP, core attention; norms ~0."""
    hq = cfg.num_attention_heads * cfg.head_dim
    mlp = 2 * 3 * cfg.hidden_size * cfg.ffn_hidden_size
    core_attn = 2 * hq * lay.seq_length  # causal QK^T and PV forward: 2 * (s/2) * hq * 2
    attn_proj = 2 * cfg.hidden_size * (2 * hq + 2 * cfg.num_kv_heads * cfg.head_dim)
    tiled = resolved_mlp_tiles(lay) > 1  # each tile re-runs in its own backward, also under full
    if lay.recompute == "full":
        per_layer = mlp + core_attn + attn_proj + tiled * mlp
    elif lay.recompute == "selective":
        per_layer = (("mlp" in lay.recompute_modules) or tiled) * mlp + ("core_attn" in lay.recompute_modules) * core_attn
    else:
        per_layer = tiled * mlp
    return cfg.num_layers * per_layer


def estimate_layout_step_time(cfg: LlamaConfig, lay: Layout, peak_tflops: float, mfu: float) -> StepTimeEstimate:
    model = training_flops_per_token(cfg, lay.seq_length)
    extra = recompute_flops_per_token(cfg, lay)
    tokens = lay.global_batch_size * lay.seq_length
    seconds = tokens * (model + extra) / lay.world_size / (peak_tflops * 1e12 * mfu)
    return StepTimeEstimate(model, extra, tokens, seconds, tokens / seconds / lay.world_size)


def estimate_step_time(cfg, world_size: int, mfu: float = 0.4, peak_tflops: Optional[float] = None,
                       model_cfg: Optional[LlamaConfig] = None) -> StepTimeEstimate:
    """Seconds per optimizer step of a resolved `TrainConfig` on `world_size` GPUs.

    Achieved FLOP/s = peak x mfu (an assumption: 0.4 is typical of dense bf16 training; measure it
    with benchmarks/gpu_check.sh). peak_tflops defaults to `train.peak_tflops` (H100 SXM: 989).
    Recompute adds its forward FLOPs at the same rate.
    """
    peak = peak_tflops if peak_tflops is not None else cfg.train.peak_tflops
    if not peak:
        raise ValueError("estimate_step_time needs peak_tflops (or train.peak_tflops in the config)")
    return estimate_layout_step_time(resolve_model_config(cfg, model_cfg), Layout.from_train_config(cfg, world_size), peak, mfu)


MFU_RANGE: tuple[float, float] = (0.45, 0.30)
"""Model-FLOPs utilisation assumed, optimistic first: an assumption of the plan (docs/parallelism_plan.md
§4), not a measurement, to be replaced by what benchmarks/gpu_check.sh measures on the first GPU run."""


def step_time_range(cfg, world_size: int, model_cfg: Optional[LlamaConfig] = None,
                    peak_tflops: Optional[float] = None,
                    mfu_range: tuple[float, float] = MFU_RANGE) -> tuple[StepTimeEstimate, StepTimeEstimate]:
    """(fastest, slowest) step of a resolved `TrainConfig` on `world_size` GPUs over `mfu_range`.
    peak_tflops defaults to `train.peak_tflops` (ValueError when neither is set)."""
    hi, lo = max(mfu_range), min(mfu_range)
    return (estimate_step_time(cfg, world_size, hi, peak_tflops, model_cfg),
            estimate_step_time(cfg, world_size, lo, peak_tflops, model_cfg))
