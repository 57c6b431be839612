"""`mu-train --dry-run --world-size N`: what a launch would do, checked in seconds on a login node.

No GPU, no process group, no weights: the config is resolved exactly as the trainer resolves it
(training/model_source.py), then checked against the world size (layout, and model/config.py's
`check_parallel_fits`, the check the model builder runs), the device (GPU-only settings on a CPU
run), the file system (data, tokenizer, starting checkpoint, resume point, log and sink targets),
the memory model of training/memory.py, and the step time of training/step_time.py. This module
computes no figure of its own.

It plans from step 0: when the starting checkpoint does not exist yet (a fresh $WORK, before the
conversion has run), the architecture is the one `model.config` declares, extended to the YaRN
target (`model.yarn.target`, else `data.seq_length` when it exceeds the declared context:
the length the conversion extends the RoPE to). Inputs that a later step of the recipe writes are
listed with that step and do not hide the plan.

Exit status (`DryRunReport.exit_code`): 0 ready to launch; 1 the plan itself has errors (layout,
memory, GPU-only settings on CPU, unwritable outputs, a broken checkpoint); 4 the plan is sound but
inputs are missing (each listed with the command that produces it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ultralong.checkpoint.paths import LATEST, resolve_megatron_checkpoint
from megatron_ultralong.model.config import ContextExtension, LlamaConfig, check_parallel_fits, load_model_config
from megatron_ultralong.training.config import TrainConfig
from megatron_ultralong.training.sinks import check_sinks

GIB = 2**30
EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_INPUTS_MISSING = 4


@dataclass
class DryRunReport:
    """What `dry_run` found. errors make the launch fail; missing inputs are produced by earlier
    steps of the recipe; warnings do not stop anything."""

    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """One line per absent input: the field, the path, and the step that writes it."""
    memory_total_bytes: Optional[float] = None
    step_seconds: Optional[tuple[float, float]] = None
    """(fastest, slowest) predicted seconds per step over step_time.MFU_RANGE."""

    @property
    def exit_code(self) -> int:
        return EXIT_ERRORS if self.errors else EXIT_INPUTS_MISSING if self.missing else EXIT_OK

    def text(self) -> str:
        out = list(self.lines)
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"missing input: {m}" for m in self.missing]
        out += [f"error: {e}" for e in self.errors]
        if self.errors:
            out.append(f"dry run: {len(self.errors)} error(s) (exit {EXIT_ERRORS})")
        elif self.missing:
            out.append(f"dry run: the plan fits; {len(self.missing)} input(s) not produced yet, run the steps "
                       f"named above first (exit {EXIT_INPUTS_MISSING})")
        else:
            out.append("dry run: OK")
        return "\n".join(out)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _download(path: str) -> str:
    """Where a model file or directory comes from: nothing in the recipe writes it."""
    directory = os.path.dirname(path) or "." if path.endswith(".json") else path
    return f"the HF model you download (huggingface-cli download <repo> --local-dir {directory})"


def _check_paths(cfg: TrainConfig, rep: DryRunReport) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    for i, path in enumerate(d.paths):
        wanted = [path + ".bin", path + ".idx"] if d.kind == "pretrain" else [path]
        absent = [f for f in wanted if not os.path.isfile(f)]
        if absent:
            producer = (f"mu-build-dataset RECIPE.yaml with output.prefix {path}" if d.kind == "pretrain"
                        else f"mu-prepare-sft CHAT_DATA {path}")
            what = f"{absent[0]} does not exist" if len(absent) == 1 else f"{' and '.join(absent)} do not exist"
            rep.missing.append(f"data.paths[{i}]: {what}; written by {producer}")
    if d.tokenizer and not os.path.exists(d.tokenizer):
        rep.missing.append(f"data.tokenizer: {d.tokenizer} does not exist; it comes with {_download(d.tokenizer)}")
    if d.kind == "sft" and not d.tokenizer:
        rep.errors.append("data.tokenizer: required for data.kind=sft (renders the chat template)")
    if m.hf_checkpoint and not os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")):
        rep.missing.append(f"model.hf_checkpoint: {m.hf_checkpoint}/config.json does not exist; it comes with "
                           f"{_download(os.path.join(m.hf_checkpoint, 'config.json'))}")
    if m.megatron_checkpoint and not os.path.exists(m.megatron_checkpoint):
        rep.missing.append(
            f"model.megatron_checkpoint: {m.megatron_checkpoint} does not exist; written by mu-convert hf-to-mcore "
            f"HF_MODEL {m.megatron_checkpoint} --yarn-target {d.seq_length} (a converted model), or by the "
            f"run whose train.save is {m.megatron_checkpoint}")
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


def _starting_checkpoint_absent(cfg: TrainConfig) -> Optional[str]:
    m = cfg.model
    if m.megatron_checkpoint and not os.path.exists(m.megatron_checkpoint):
        return m.megatron_checkpoint
    if m.hf_checkpoint and not os.path.isfile(os.path.join(m.hf_checkpoint, "config.json")):
        return m.hf_checkpoint
    return None


def plan_model_config(cfg: TrainConfig) -> tuple[LlamaConfig, str]:
    """(architecture, where it came from) for the plan: the trainer's own resolution when the starting
    checkpoint exists, else `model.config` extended to the YaRN target (module docstring)."""
    from megatron_ultralong.training.model_source import resolve_model_config

    m = cfg.model
    absent = _starting_checkpoint_absent(cfg)
    if absent is None:
        source = m.hf_checkpoint or (resolve_megatron_checkpoint(m.megatron_checkpoint, "model.megatron_checkpoint")
                                     if m.megatron_checkpoint else None) or f"random init ({m.config or 'tiny'})"
        return resolve_model_config(cfg), f"weights from {source}"
    if m.config is None:
        raise ValueError(f"the starting checkpoint {absent} does not exist yet and model.config is not set: "
                         "declare the architecture (e.g. model.config=llama3.1-8b) to plan before it exists")
    declared = load_model_config(m.config)
    yarn = m.yarn
    if yarn is None and cfg.data.seq_length > declared.max_position_embeddings:
        yarn = ContextExtension(cfg.data.seq_length)  # shapes and length are what the plan needs
    note = f"planned from model.config={m.config!r}, as {absent} does not exist yet"
    if yarn is not None:
        declared = yarn.apply(declared)
        which = "model.yarn.target" if m.yarn is not None else "data.seq_length"
        note += f", with YaRN to {yarn.target:,} ({which})"
    return declared, note


def _check_layout(cfg: TrainConfig, model_cfg: LlamaConfig, world_size: int, rep: DryRunReport) -> Optional[int]:
    p = cfg.parallel
    try:
        dp = cfg.check_world(world_size)
    except ValueError as e:
        rep.errors.append(str(e))
        return None
    if p.pipeline_parallel > 1:
        rep.errors.append("parallel.pipeline_parallel > 1: the training loop runs a single pipeline stage")
    try:
        check_parallel_fits(model_cfg, p.tensor_parallel, p.pipeline_parallel,
                            "parallel.tensor_parallel=", "parallel.pipeline_parallel=")
    except ValueError as e:
        rep.errors.append(str(e))
    if cfg.data.seq_length > model_cfg.max_position_embeddings:
        rep.errors.append(f"data.seq_length={cfg.data.seq_length} exceeds the model's max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}; set model.yarn.target to extend it")
    micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    rep.lines.append(
        f"layout: world {world_size} = TP{p.tensor_parallel} x PP{p.pipeline_parallel} x CP{p.context_parallel}"
        f" x DP{dp}; {cfg.data.seq_length // p.context_parallel:,} tokens per TP group"
        f" ({cfg.data.seq_length // (p.context_parallel * p.tensor_parallel):,} per GPU); {micro} micro-batch(es) per step")
    return dp


def _check_device(cfg: TrainConfig, model_cfg: LlamaConfig, rep: DryRunReport) -> None:
    """A CPU run refuses GPU-only settings at start; say so now (the trainer's own checks)."""
    if cfg.train.device != "cpu":
        return
    import torch

    from megatron_ultralong.parallel.runtime import check_device_support

    try:
        check_device_support(cfg.parallel, torch.device("cpu"), model_cfg.tie_word_embeddings)
    except ValueError as e:
        rep.errors.append(f"train.device=cpu: {e}")


def _cheapest_fit(cfg: TrainConfig, world_size: int, model_cfg: LlamaConfig, device_bytes: float) -> str:
    """The first rung of training/memory_fit.py's MEMORY_LADDER that fits 90% of the device, as overrides."""
    from megatron_ultralong.training.memory import Layout
    from megatron_ultralong.training.memory_fit import choose_recompute

    fit = choose_recompute(model_cfg, Layout.from_train_config(cfg, world_size), 0.9 * device_bytes)
    if fit is None:
        return "no recompute, tiling or offload setting fits this layout: raise TP/CP"
    settings = [f"model.recompute={fit.recompute}"]
    if fit.recompute == "selective":
        settings.append(f"model.recompute_modules=[{','.join(fit.recompute_modules)}]")
    settings += [f"model.mlp_tiles={fit.mlp_tiles}"] * (fit.mlp_tiles > 1)
    settings += [f"model.activation_offload={fit.activation_offload:g}"] * (fit.activation_offload > 0)
    settings += [f"optim.cpu_offload_fraction={fit.optimizer_offload:g}"] * (fit.optimizer_offload > 0)
    return "the cheapest setting that fits 90% of it is " + " ".join(settings)


def _check_dataset_facts(cfg: TrainConfig, model_cfg: LlamaConfig, rep: DryRunReport) -> None:
    """What the trainer checks against each dataset's PREFIX.dataset.json at start-up (document
    boundaries, tokenizer), when the datasets exist."""
    d = cfg.data
    if d.kind != "pretrain" or not all(os.path.isfile(p + ext) for p in d.paths for ext in (".bin", ".idx")):
        return
    from megatron_ultralong.data.samples.pretrain import document_boundary
    from megatron_ultralong.training.startup_checks import dataset_tokenizer_problem

    try:
        document_boundary(d)
        tokenizers = [("data.tokenizer", d.tokenizer)] if d.tokenizer and os.path.exists(d.tokenizer) else []
        problem = dataset_tokenizer_problem(d.paths, model_cfg.vocab_size, tokenizers)
    except ValueError as e:
        problem = str(e)
    if problem:
        rep.errors.append(problem)


def dry_run(cfg: TrainConfig, world_size: int, device_memory_gib: float = 80.0, gpus_per_node: int = 8,
            host_memory_gib: Optional[float] = None) -> DryRunReport:
    """Check `cfg` for a launch on `world_size` GPUs of `device_memory_gib` each, `gpus_per_node` per
    node with `host_memory_gib` of host memory for the offloaded state when given (see module doc)."""
    from megatron_ultralong.training.memory import estimate_memory
    from megatron_ultralong.training.step_time import MFU_RANGE, step_time_range

    rep = DryRunReport()
    _check_paths(cfg, rep)
    try:
        model_cfg, source = plan_model_config(cfg)
    except (ValueError, OSError) as e:
        rep.errors.append(str(e))
        return rep
    r = model_cfg.rope
    rep.lines.insert(0, f"model: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab "
                        f"{model_cfg.vocab_size:,}; {source}")
    rep.lines.insert(1, f"rope: {r.rope_type}, theta {r.theta:g}" + (f", factor {r.factor:g}" if r.factor else "")
                     + f"; max positions {model_cfg.max_position_embeddings:,}")
    dp = _check_layout(cfg, model_cfg, world_size, rep)
    _check_device(cfg, model_cfg, rep)
    _check_dataset_facts(cfg, model_cfg, rep)
    if dp is None:
        return rep
    est = estimate_memory(cfg, world_size, model_cfg)
    total = est.total
    rep.memory_total_bytes = total
    device = device_memory_gib * GIB
    rep.lines.append(
        f"memory per GPU (training/memory.py, estimate): {total / GIB:.2f} GiB = {100 * total / device:.0f}% of "
        f"{device_memory_gib:g} GiB (" + ", ".join(f"{k} {getattr(est, k) / GIB:.2f}" for k in est.DEVICE_FIELDS) + ")")
    per_node = min(world_size, gpus_per_node)
    rep.lines.append(
        f"host memory per node (training/memory.py, estimate): {est.host_total * per_node / GIB:.1f} GiB for "
        f"{per_node} GPUs ({est.host_total / GIB:.2f} GiB per GPU: offloaded activations "
        f"{est.host_activations / GIB:.2f}, optimizer {est.host_optimizer / GIB:.2f}); pinned, beside the "
        "framework's own host memory")
    if host_memory_gib is not None and est.host_total * per_node > host_memory_gib * GIB:
        rep.errors.append(f"the offloaded state {est.host_total * per_node / GIB:.0f} GiB per node exceeds "
                          f"--host-memory-gib {host_memory_gib:g}: lower model.activation_offload or "
                          "optim.cpu_offload_fraction")
    if total > device:
        rep.errors.append(f"the memory estimate {total / GIB:.1f} GiB exceeds the device's {device_memory_gib:g} GiB: "
                          + _cheapest_fit(cfg, world_size, model_cfg, device))
    elif total > 0.9 * device:
        rep.warnings.append("the memory estimate leaves under 10% of the device free (allocator slack and NCCL "
                            "buffers are not modelled)")
    peak = cfg.train.peak_tflops
    if peak:
        fast, slow = step_time_range(cfg, world_size, model_cfg)
        rep.step_seconds = (fast.seconds, slow.seconds)
        steps = cfg.train.steps
        rep.lines.append(
            f"step time (predicted by training/step_time.py at MFU {max(MFU_RANGE):.0%}..{min(MFU_RANGE):.0%} of {peak:g} TFLOP/s): "
            f"{fast.seconds:.1f}..{slow.seconds:.1f} s/step; {steps} steps in {_hours(fast.seconds * steps)}.."
            f"{_hours(slow.seconds * steps)} ({fast.model_flops_per_token * fast.tokens_per_step:.3e} model "
            f"FLOPs/step + {fast.recompute_flops_per_token * fast.tokens_per_step:.3e} recompute)")
    else:
        rep.lines.append("step time: not predicted (set train.peak_tflops, e.g. 989 for H100 SXM bf16)")
    return rep
