"""Where step metrics go besides the log line: a JSONL file, TensorBoard, Weights & Biases.

Every sink receives the same dict (training/progress.py) and writes the same scalars, so a curve in
TensorBoard is the number in the step line. Optional packages are checked by `check_sinks` when
the run starts -- before the model is built -- so a missing extra costs seconds, not the set-up of
a 256-GPU job. Only rank 0 opens sinks.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

SCALARS = (
    "loss", "lr", "grad_norm", "seconds", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_device",
    "mfu", "mem_allocated_gib", "mem_reserved_gib", "mem_peak_gib", "mem_peak_pct", "eta_s", "loss_tokens",
)
"""Scalars written to TensorBoard and W&B (as train/<name>), when present in the step's metrics."""


def _missing(module: str, extra: str, field: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return f"{field} is set but {module} is not installed: pip install 'megatron-ultralong[{extra}]'"
    return None


def check_sinks(train) -> list[str]:
    """Problems with the configured sinks (train: TrainSection), one line each; [] when all is well."""
    problems = []
    if train.tensorboard_dir:
        problems.append(_missing("tensorboard", "tensorboard", "train.tensorboard_dir"))
    if train.wandb_project:
        problems.append(_missing("wandb", "wandb", "train.wandb_project"))
    return [p for p in problems if p]


def _tensorboard_writer(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter(log_dir)


class MetricSinks:
    """Opens the configured sinks on the logging rank; `write(metrics)` per logged step."""

    def __init__(self, train, config_dict: dict, is_logger: bool, tensorboard_factory=_tensorboard_writer):
        """train: TrainSection; config_dict: the resolved config (recorded by W&B as the run config).
        tensorboard_factory: log_dir -> an object with add_scalar/flush/close (tests pass a stand-in)."""
        self.log_file = train.log_file if is_logger else None
        self.tb: Any = None
        self.wandb: Any = None
        if not is_logger:
            return
        if self.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_file)), exist_ok=True)
        if train.tensorboard_dir:
            os.makedirs(train.tensorboard_dir, exist_ok=True)
            self.tb = tensorboard_factory(train.tensorboard_dir)
        if train.wandb_project:
            import wandb

            # resume="allow" + WANDB_RUN_ID (set it in the job script) continues the same run after
            # a requeue; WANDB_MODE=offline keeps everything local for a later `wandb sync`.
            self.wandb = wandb.init(project=train.wandb_project, name=train.wandb_run_name,
                                    config=config_dict, resume="allow")

    def write(self, metrics: dict) -> None:
        step = int(metrics["step"])
        if self.log_file:
            from megatron_ultralong.training.guards import metrics_line

            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(metrics_line(metrics))  # strict JSON: non-finite values as strings
        scalars = {f"train/{k}": float(metrics[k]) for k in SCALARS if k in metrics}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
