"""Which architecture a training run builds, from where: one function for the trainer and the dry run.

`model.config` unset means "the starting checkpoint's own": an HF checkpoint's config.json, or the
config a Megatron checkpoint recorded (a converted model already carries its YaRN RoPE, so the
recipe does not re-apply it). `model.yarn`, when set, replaces the RoPE on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_ultralong.checkpoint.paths import checkpoint_model_config, require_megatron_checkpoint
from megatron_ultralong.model.config import LlamaConfig, load_model_config
from megatron_ultralong.training.config import TrainConfig


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings")


def initial_megatron_checkpoint(cfg: TrainConfig) -> Optional[Path]:
    """model.megatron_checkpoint resolved to its torch_dist model directory (checkpoint/paths.py)."""
    if not cfg.model.megatron_checkpoint:
        return None
    return require_megatron_checkpoint(cfg.model.megatron_checkpoint, "model.megatron_checkpoint")


def resolve_model_config(cfg: TrainConfig) -> LlamaConfig:
    """The architecture, with the YaRN context extension applied when configured."""
    m = cfg.model
    if m.hf_checkpoint:
        model_cfg = load_model_config(m.hf_checkpoint)
    elif m.megatron_checkpoint:
        model_cfg = checkpoint_model_config(m.megatron_checkpoint)
    else:
        model_cfg = load_model_config(m.config or "tiny")
    if m.config is not None and (m.hf_checkpoint or m.megatron_checkpoint):
        # An explicit model.config next to a checkpoint is a declaration: check it now, by name,
        # rather than as a shape mismatch deep inside the load.
        declared = load_model_config(m.config)
        diffs = [f"{k}: model.config {getattr(declared, k)!r} vs checkpoint {getattr(model_cfg, k)!r}"
                 for k in _SHAPE_FIELDS if getattr(declared, k) != getattr(model_cfg, k)]
        if diffs:
            raise ValueError(f"model.config={m.config!r} does not match the starting checkpoint: " + "; ".join(diffs))
    if m.yarn is not None:
        model_cfg = m.yarn.apply(model_cfg)
    return model_cfg


def recompute_overrides(cfg: TrainConfig) -> dict:
    """megatron-core TransformerConfig fields for `model.recompute` (the trainer builds the model with
    them; they run on CPU too, parallel/runtime.py accommodation 5)."""
    mode = cfg.model.recompute
    if mode == "none":
        return {}
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(cfg.model.recompute_modules))
    return dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=cfg.model.recompute_num_layers)
