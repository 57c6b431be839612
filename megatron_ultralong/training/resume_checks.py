"""What a resume may carry over from the checkpoint, and what it must say it changes.

Two checks run on every resume candidate before it is verified or loaded (checkpoint/train_state.py
`resume(check=...)`):

- **The model**: the checkpoint's run trained some architecture with some RoPE (recorded in its
  `model/ultralong_checkpoint.json`); resuming it into a model that differs (another YaRN factor,
  another layer count) would either fail deep in the load or, where the shapes agree (RoPE), train
  the wrong model silently. Any difference is refused, naming the fields and both sources.
- **The schedule**: megatron-core's `OptimizerParamScheduler.load_state_dict` keeps the
  checkpoint's lr, min_lr, warmup, decay length and style and weight decay (`_check_and_set` with
  `use_checkpoint_opt_param_scheduler=True`), and torch's `Optimizer.load_state_dict` keeps the
  saved betas and eps. A changed value is therefore reported by name. With
  `train.override_schedule=true` the new values apply instead (megatron's
  `override_opt_param_scheduler`, and the betas/eps written into the optimizer's groups after the
  load); asking for that with a schedule that ends before the checkpoint's step is refused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from megatron_ultralong.checkpoint.info import model_config_differences, read_checkpoint_info
from megatron_ultralong.checkpoint.paths import MODEL_SUBDIR
from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.training.config import TrainConfig

logger = logging.getLogger(__name__)

SCHEDULE_FIELDS = {  # megatron scheduler state key -> the config field it comes from
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "lr_warmup_steps": "optim.warmup_steps",
    "lr_decay_steps": "train.steps",
    "lr_decay_style": "optim.decay_style",
    "start_wd": "optim.weight_decay",
}
OPTIMIZER_FIELDS = ("adam_beta1", "adam_beta2", "adam_eps")
"""Hyper-parameters torch/megatron keep in the optimizer's param groups (restored by its load)."""
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""Carried to the exported config.json only: no weight or computation depends on them."""


def model_source(cfg: TrainConfig) -> str:
    """Where this run's architecture comes from, as the user wrote it."""
    m = cfg.model
    if m.hf_checkpoint:
        where = f"model.hf_checkpoint={m.hf_checkpoint}"
    elif m.megatron_checkpoint:
        where = f"model.megatron_checkpoint={m.megatron_checkpoint}"
    else:
        where = f"model.config={m.config or 'tiny'}"
    return where + (f" with model.yarn.target={m.yarn.target}" if m.yarn else "")


def check_same_model(path: Path, model_cfg: LlamaConfig, cfg: TrainConfig) -> None:
    """Refuse a checkpoint whose run trained another architecture or RoPE (names both sides)."""
    try:
        saved = read_checkpoint_info(Path(path) / MODEL_SUBDIR).model_config
    except (ValueError, OSError):
        return  # unreadable: the manifest check and the load report it, naming the file
    diffs = [d for d in model_config_differences(saved, model_cfg) if not d.startswith(_TOKEN_FIELDS)]
    if diffs:
        raise ValueError(
            f"train.load={cfg.train.load_dir}: {path} was trained as another model than this run's "
            f"({model_source(cfg)}): {'; '.join(diffs)} (checkpoint vs this run). Resuming it would "
            "train the wrong model: give this run its own train.save (and train.load), or start it "
            "from that checkpoint's weights with model.megatron_checkpoint=<checkpoint>"
        )


def schedule_changes(state: dict, fresh_scheduler_state: dict, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(config field, checkpoint's value, this run's value) for every schedule or optimizer
    setting the resume would keep from the checkpoint."""
    saved_sched = state.get("scheduler") or {}
    out = [(name, saved_sched[key], fresh_scheduler_state[key]) for key, name in SCHEDULE_FIELDS.items()
           if key in saved_sched and saved_sched[key] != fresh_scheduler_state[key]]
    saved_optim = (state.get("config") or {}).get("optim") or {}
    out += [(f"optim.{k}", saved_optim[k], getattr(cfg.optim, k)) for k in OPTIMIZER_FIELDS
            if k in saved_optim and saved_optim[k] != getattr(cfg.optim, k)]
    return out


def report_schedule(path: Path, state: dict, fresh_scheduler_state: dict, cfg: TrainConfig) -> list[str]:
    """Warn naming each changed setting (kept, or applied with train.override_schedule); refuse an
    override whose schedule ends before the step it resumes at. Returns the changed field names."""
    changes = schedule_changes(state, fresh_scheduler_state, cfg)
    step = int(state.get("step", 0))
    saved_optim = (state.get("config") or {}).get("optim") or {}
    if saved_optim.get("clip_grad", cfg.optim.clip_grad) != cfg.optim.clip_grad:
        logger.warning("resuming %s: optim.clip_grad changes from %s to %s (applied: clipping reads the config "
                       "every step)", path, saved_optim["clip_grad"], cfg.optim.clip_grad)
    if not changes:
        return []
    listing = "; ".join(f"{name}: checkpoint {old!r}, this run {new!r}" for name, old, new in changes)
    if cfg.train.override_schedule:
        if cfg.train.steps <= step:
            raise ValueError(
                f"train.override_schedule=true with train.steps={cfg.train.steps}: {path} is at step {step}, "
                "so the new schedule would have ended before it; raise train.steps or drop the override"
            )
        logger.warning("resuming %s with train.override_schedule=true: the new schedule applies from step %d "
                       "(%s)", path, step + 1, listing)
    else:
        tail = ""
        old_end = (state.get("scheduler") or {}).get("lr_decay_steps")
        if old_end is not None and cfg.train.steps > old_end >= step:
            tail = (f"; the checkpoint's decay ends at step {old_end}, so steps {max(step, old_end) + 1}-"
                    f"{cfg.train.steps} run at its min_lr {(state.get('scheduler') or {}).get('min_lr')}")
        logger.warning("resuming %s keeps the checkpoint's schedule and optimizer settings, NOT this run's: %s%s. "
                       "Set train.override_schedule=true to apply the new values", path, listing, tail)
    return [name for name, _, _ in changes]


def apply_optimizer_override(optimizer: Any, cfg: TrainConfig) -> None:
    """After the optimizer state was loaded: this run's betas and eps in every param group."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (cfg.optim.adam_beta1, cfg.optim.adam_beta2)
        if "eps" in group:
            group["eps"] = cfg.optim.adam_eps
