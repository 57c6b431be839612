"""`mu-train --dry-run --world-size N`: what a launch would do, checked in seconds on a login node.

No GPU, no process group, no weights: the config is resolved exactly as the trainer resolves it
(training/model_source.py), then checked against the world size (layout, divisibility), the file
system (data, tokenizer, starting checkpoint, resume point, log and sink targets), and the memory
model of training/memory.py, and the step time is predicted from the model FLOPs
(training/metrics.py) at an assumed MFU range.

The memory model is reached through `memory_estimate` only, so re-pointing it at a reworked
training/memory.py is a one-function change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ultralong.checkpoint.paths import LATEST, resolve_megatron_checkpoint
from megatron_ultralong.training.config import TrainConfig
from megatron_ultralong.training.sinks import check_sinks

GIB = 2**30
DEFAULT_MFU_RANGE = (0.28, 0.40)
"""MFU assumed for the step-time prediction: the range docs/parallelism_plan.md's time budget uses
for Llama-3.1-8B at 1M tokens with full recompute (317 .. 454 tokens/s/GPU on H100, i.e. about
28% .. 40% of 989 TFLOP/s)."""


def memory_estimate(model_cfg, cfg: TrainConfig, dp: int) -> tuple[float, dict[str, float]]:
    """Adapter to the one memory model: (total bytes per GPU, {component: bytes}).

    Today's training/memory.py API is `estimate_memory_per_device(model_cfg, train_cfg, dp)`
    returning a `MemoryEstimate` dataclass; only this function knows that."""
    from dataclasses import fields

    from megatron_ultralong.training.memory import estimate_memory_per_device

    est = estimate_memory_per_device(model_cfg, cfg, dp)
    return float(est.total), {f.name: float(getattr(est, f.name)) for f in fields(est)}


@dataclass
class DryRunReport:
    """What `dry_run` found. errors make the launch fail; warnings do not."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    memory_total_bytes: Optional[float] = None
    step_seconds: Optional[tuple[float, float]] = None

    def text(self) -> str:
        out = list(self.lines)
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"error: {e}" for e in self.errors]
        out.append("dry run: OK" if not self.errors else f"dry run: {len(self.errors)} error(s)")
        return "\n".join(out)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _check_paths(cfg: TrainConfig, rep: DryRunReport) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    for i, path in enumerate(d.paths):
        wanted = [path + ".bin", path + ".idx"] if d.kind == "pretrain" else [path]
        for f in wanted:
            if not os.path.isfile(f):
                rep.errors.append(f"data.paths[{i}]: {f} does not exist")
    if d.tokenizer and not os.path.exists(d.tokenizer):
        rep.errors.append(f"data.tokenizer: {d.tokenizer} does not exist")
    if d.kind == "sft" and not d.tokenizer:
        rep.errors.append("data.tokenizer: required for data.kind=sft (renders the chat template)")
    if m.hf_checkpoint and not os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")):
        rep.errors.append(f"model.hf_checkpoint: {m.hf_checkpoint}/config.json does not exist")
    if t.load:
        pointer = os.path.join(t.load, LATEST)
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as f:
                rep.lines.append(f"resume: from {os.path.join(t.load, f.read().strip())} ({pointer})")
        else:
            rep.lines.append(f"resume: no checkpoint in {t.load} yet: starts from step 0")
    if t.save:
        parent = os.path.dirname(os.path.abspath(t.save)) or "."
        existing = parent
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK):
            rep.errors.append(f"train.save: cannot create {t.save} ({existing} is not writable)")
    else:
        rep.warnings.append("train.save is not set: nothing is checkpointed")
    rep.errors.extend(check_sinks(t))


def _check_layout(cfg: TrainConfig, model_cfg, world_size: int, rep: DryRunReport) -> Optional[int]:
    p = cfg.parallel
    try:
        dp = cfg.check_world(world_size)
    except ValueError as e:
        rep.errors.append(str(e))
        return None
    if p.pipeline_parallel > 1:
        rep.errors.append("parallel.pipeline_parallel > 1: the training loop runs a single pipeline stage")
    for name in ("num_attention_heads", "num_kv_heads"):
        if getattr(model_cfg, name) % p.tensor_parallel:
            rep.errors.append(f"parallel.tensor_parallel={p.tensor_parallel} does not divide the model's "
                              f"{name}={getattr(model_cfg, name)}")
    if model_cfg.num_layers % p.pipeline_parallel:
        rep.errors.append(f"parallel.pipeline_parallel={p.pipeline_parallel} does not divide "
                          f"num_layers={model_cfg.num_layers}")
    if cfg.data.seq_length > model_cfg.max_position_embeddings:
        rep.errors.append(f"data.seq_length={cfg.data.seq_length} exceeds the model's max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}; set model.yarn_target_length to extend it")
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    rep.lines.append(
        f"layout: world {world_size} = TP{p.tensor_parallel} x PP{p.pipeline_parallel} x CP{p.context_parallel}"
        f" x DP{dp}; {cfg.data.seq_length // p.context_parallel:,} tokens per GPU; {micro} micro-batch(es) per step")
    return dp


def dry_run(cfg: TrainConfig, world_size: int, device_memory_gib: float = 80.0,
            mfu_range: tuple[float, float] = DEFAULT_MFU_RANGE) -> DryRunReport:
    """Check `cfg` for a launch on `world_size` GPUs of `device_memory_gib` each (see module doc)."""
    from megatron_ultralong.training.metrics import training_flops_per_token
    from megatron_ultralong.training.model_source import resolve_model_config

    rep = DryRunReport()
    try:
        model_cfg = resolve_model_config(cfg)
    except (ValueError, OSError) as e:
        rep.errors.append(str(e))
        _check_paths(cfg, rep)
        return rep
    r = model_cfg.rope
    m = cfg.model
    source = m.hf_checkpoint or (resolve_megatron_checkpoint(m.megatron_checkpoint, "model.megatron_checkpoint")
                                 if m.megatron_checkpoint else None) or f"random init ({m.config or 'tiny'})"
    rep.lines.append(f"model: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab "
                     f"{model_cfg.vocab_size:,}; weights from {source}")
    rep.lines.append(f"rope: {r.rope_type}, theta {r.theta:g}" + (f", factor {r.factor:g}" if r.factor else "")
                     + f"; max positions {model_cfg.max_position_embeddings:,}")
    dp = _check_layout(cfg, model_cfg, world_size, rep)
    _check_paths(cfg, rep)
    if dp is None:
        return rep
    total, parts = memory_estimate(model_cfg, cfg, dp)
    rep.memory_total_bytes = total
    device = device_memory_gib * GIB
    rep.lines.append(
        f"memory per GPU (training/memory.py): {total / GIB:.2f} GiB = {100 * total / device:.0f}% of "
        f"{device_memory_gib:g} GiB (" + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) + ")")
    if total > device:
        rep.errors.append(f"the memory estimate {total / GIB:.1f} GiB exceeds the device's {device_memory_gib:g} GiB: "
                          "raise TP/CP or use model.recompute=full")
    elif total > 0.9 * device:
        rep.warnings.append(f"the memory estimate leaves under 10% of the device free (allocator slack and NCCL "
                            "buffers are not modelled)")
    tokens_step = cfg.train.global_batch_size * cfg.data.seq_length
    flops_step = training_flops_per_token(model_cfg, cfg.data.seq_length) * tokens_step
    peak = cfg.train.peak_tflops
    if peak:
        lo, hi = (flops_step / (world_size * peak * 1e12 * mfu) for mfu in sorted(mfu_range, reverse=True))
        rep.step_seconds = (lo, hi)
        rep.lines.append(
            f"step time (predicted, MFU {min(mfu_range):.0%}..{max(mfu_range):.0%} of {peak:g} TFLOP/s): "
            f"{lo:.1f}..{hi:.1f} s/step; {cfg.train.steps} steps in {_hours(lo * cfg.train.steps)}.."
            f"{_hours(hi * cfg.train.steps)} ({flops_step:.3e} model FLOPs/step)")
    else:
        rep.lines.append("step time: not predicted (set train.peak_tflops, e.g. 989 for H100 SXM bf16)")
    return rep
