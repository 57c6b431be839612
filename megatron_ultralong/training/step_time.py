"""The step-time prediction every planner prints: training/memory.py's FLOPs model at one MFU range.

`memory.estimate_step_time` is the formula (model FLOPs of training/metrics.py plus the forward
FLOPs the recompute setting re-runs, at peak x MFU); this module holds the one assumption that
turns it into a plan, the MFU range, so `mu-train --dry-run` and benchmarks/memory_plan.py (which
prints docs/parallelism_plan.md's tables) quote the same seconds per step.
"""
from __future__ import annotations

from typing import Optional

from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.training.memory import StepTimeEstimate, estimate_step_time

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
