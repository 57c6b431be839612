"""The training configuration: one YAML file plus `key.sub=value` overrides (tools/train.py).

Every field is declared here with a docstring; sections validate themselves and raise ValueError
naming the field. Values the UltraLong paper (arXiv 2504.06214) does not state (schedule, warmup,
betas, batch for 1M/2M) are fields with neutral defaults, set explicitly in examples/ recipes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from megatron_ultralong.config_io import apply_overrides, from_dict, load_yaml
from megatron_ultralong.data.samples.config import DataSection
from megatron_ultralong.model.config import ContextExtension
from megatron_ultralong.parallel.config import ParallelConfig

_EXIT_SIGNALS = frozenset({"SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGQUIT"})
"""Signals train.exit_signals may name (catchable, and ones Slurm or a launcher sends)."""


@dataclass(frozen=True)
class ModelSection:
    """Which model, how it starts, and how it is computed."""

    config: Optional[str] = None
    """Architecture: a preset name (tiny, llama3.2-1b, llama3.1-8b, llama3.1-70b), or an HF
    config.json / model directory. None: the starting checkpoint's own (hf_checkpoint's config.json,
    megatron_checkpoint's recorded config, RoPE included), else "tiny"."""

    hf_checkpoint: Optional[str] = None
    """Start from these HF weights (safetensors directory). Mutually exclusive with megatron_checkpoint."""

    megatron_checkpoint: Optional[str] = None
    """Start from this Megatron checkpoint (weights only; use train.load to resume a run): a converted
    model directory (`mu-convert hf-to-mcore`), a training iter_* directory, or a training save
    directory (its `latest`)."""

    allow_unverified: bool = False
    """Load model.megatron_checkpoint even when its files differ from its manifest.json (CRC-32 per
    file, checked by default before any weight is read)."""

    yarn: Optional[ContextExtension] = None
    """Context extension on top of the starting model's RoPE: {target, original, beta_fast, beta_slow}
    (model/config.py `ContextExtension`; `yarn: 1048576` is short for {target: 1048576}): YaRN with
    factor = target / original (UltraLong: target 1048576, 2097152 or 4194304, original 8192,
    beta_fast 4, beta_slow 1) and max_position_embeddings = target. None: the RoPE as loaded (the
    recipes apply YaRN once, in the conversion)."""

    params_dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and activation dtype (bf16 with fp32 main weights in the optimizer on GPU)."""

    use_transformer_engine: Optional[bool] = None
    """Layer spec with TE modules; None = when importable."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute (megatron-core's `recompute_granularity`; on CPU too, parallel/runtime.py
    accommodation 5): none; selective = the submodules in `recompute_modules`; full = whole layers.
    Choose the cheapest setting that fits (training/memory_fit.py `choose_recompute`)."""

    recompute_modules: tuple[Literal["core_attn", "layernorm", "mlp"], ...] = ("layernorm", "mlp")
    """With selective recompute: megatron-core's `recompute_modules`. "layernorm" drops both RMSNorm
    outputs (almost free to recompute), "mlp" the SwiGLU MLP's internals (+1 MLP forward, ~1% of a
    1M-token step), "core_attn" only the attention kernel's lse while re-running attention itself
    (the costliest part at long context; rarely worth it)."""

    recompute_num_layers: int = 1
    """With full recompute: layers per recompute chunk (uniform method)."""

    mlp_tiles: int = 1
    """Run each layer's SwiGLU MLP over the sequence in this many tiles, each recomputed in its own
    backward (DeepSpeed ALST's TiledMLP, arXiv 2506.13996; model/tiled_mlp.py): the MLP keeps only
    its input, and its backward working set (re-run activations, gradients, sequence-parallel
    buffers) shrinks by this factor, for one more MLP forward per step. 1 = off."""

    activation_offload: float = 0.0
    """Fraction of the layers (the first round(f x layers)) whose saved activations wait in host
    memory between forward and backward and come back one layer ahead of their backward
    (model/activation_offload.py; pinned memory and side streams on GPU). With recompute=full that
    is each layer's input; otherwise the layer's whole saved set. 0 = off."""

    def __post_init__(self) -> None:
        if self.hf_checkpoint and self.megatron_checkpoint:
            raise ValueError("model.hf_checkpoint and model.megatron_checkpoint are mutually exclusive")
        if self.recompute == "selective" and not self.recompute_modules:
            raise ValueError("model.recompute=selective needs model.recompute_modules (e.g. [layernorm, mlp])")
        if self.recompute_num_layers < 1:
            raise ValueError(f"model.recompute_num_layers={self.recompute_num_layers}: expected >= 1")
        if self.mlp_tiles < 1:
            raise ValueError(f"model.mlp_tiles={self.mlp_tiles}: expected >= 1 (1 = off)")
        if self.mlp_tiles > 1 and self.recompute == "selective" and "mlp" in self.recompute_modules:
            raise ValueError("model.mlp_tiles > 1 already recomputes the MLP tile by tile: remove 'mlp' from "
                             "model.recompute_modules")
        if not 0.0 <= self.activation_offload <= 1.0:
            raise ValueError(f"model.activation_offload={self.activation_offload}: expected a fraction in [0, 1]")


@dataclass(frozen=True)
class OptimSection:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-5
    """Peak learning rate (UltraLong CPT: 3e-5; SFT: 5e-6)."""

    min_lr: float = 0.0
    """Floor of the decay."""

    warmup_steps: int = 0
    """Linear warmup steps (the paper states none: UNCONFIRMED)."""

    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup, to min_lr at train.steps."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.95
    """AdamW beta2 (0.95 per one secondary source: UNCONFIRMED)."""

    adam_eps: float = 1e-8
    """AdamW epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""

    cpu_offload_fraction: float = 0.0
    """Fraction of the optimizer's parameters whose fp32 master weights and Adam moments live, and
    are stepped, in host memory (megatron-core's `optimizer_cpu_offload` /
    `optimizer_offload_fraction`: HybridDeviceOptimizer under the precision-aware distributed
    optimizer). Pays where DP x CP is small (one node), since the distributed optimizer shards these
    12 B/param over DP x CP. GPU runs; a CPU run's optimizer is in host memory already. 0 = off."""

    def __post_init__(self) -> None:
        for f in fields(self):  # NaN compares false with everything: test finiteness first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"optim.{f.name}={value}: expected a finite number")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: expected >= 0")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad}: expected >= 0")
        if self.weight_decay < 0 or self.adam_eps <= 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay}, optim.adam_eps={self.adam_eps}: "
                             "need weight_decay >= 0 and adam_eps > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)}: expected 0 <= beta < 1")
        if not 0.0 <= self.cpu_offload_fraction <= 1.0:
            raise ValueError(f"optim.cpu_offload_fraction={self.cpu_offload_fraction}: expected a fraction in [0, 1]")


@dataclass(frozen=True)
class TrainSection:
    """The loop: batch, steps, checkpoints, logs."""

    steps: int = 10
    """Optimizer steps to train (the UltraLong recipes: CPT 125 / 125 / 150, SFT 480 / 140 / 150 for 1M / 2M / 4M)."""

    micro_batch_size: int = 1
    """Sequences per forward per data-parallel rank."""

    global_batch_size: int = 1
    """Sequences per optimizer step over all DP ranks (UltraLong 4M: 2); must be a multiple of
    micro_batch_size x DP. The remainder is gradient accumulation."""

    seed: int = 1234
    """Seed for init, data order and dropout."""

    save: Optional[str] = None
    """Checkpoint directory (iter_XXXXXXX subdirectories, `latest` pointer)."""

    save_interval: int = 0
    """Save every N steps (0: only at the end, if save is set)."""

    load: Optional[str] = None
    """Resume from the latest complete checkpoint here (model, optimizer, scheduler, RNG, data).
    None = train.save (auto-resume: a requeued job continues with no extra flag). When it holds no
    checkpoint the run says so and starts from scratch."""

    overwrite: bool = False
    """Allow starting in a train.save that holds checkpoints this run did not resume from (they are
    moved aside to `<save>/.overwritten-<time>/`, never deleted). False: refuse at start."""

    max_bad_steps: int = 1
    """Consecutive steps with a NaN/Inf loss or grad norm before the run stops (exit code 3); bad
    steps apply no update and are never saved. 1 = stop at the first."""

    exit_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    """On these signals finish the current step, save, and exit with code 75 (requeue)."""

    exit_duration_minutes: Optional[float] = None
    """Save and exit (code 75) after this many minutes of wall time since start; set it to the
    allocation minus one step, one save and start-up. None = no limit."""

    override_schedule: bool = False
    """On resume, apply this run's optim.lr, min_lr, warmup_steps, decay_style, weight_decay, betas,
    eps and train.steps (the decay length) from the checkpoint's step on. False: the checkpoint's
    schedule and optimizer settings continue, and every difference is reported by name."""

    keep_last: Optional[int] = None
    """Keep only the newest N checkpoints (older ones deleted after a new one is complete); None = all."""

    keep_every: Optional[int] = None
    """With keep_last: also keep every checkpoint whose step is a multiple of this."""

    log_interval: int = 1
    """Print metrics every N steps."""

    log_file: Optional[str] = None
    """Also append one JSON line of metrics per logged step here (rank 0)."""

    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (rank 0; needs the `tensorboard` extra)."""

    wandb_project: Optional[str] = None
    """Also log the step scalars to this Weights & Biases project (rank 0; needs the `wandb` extra;
    WANDB_MODE=offline writes locally for a later `wandb sync`)."""

    wandb_run_name: Optional[str] = None
    """W&B run name (default: W&B's own); a requeued job resumes the same run through WANDB_RUN_ID."""

    loss_chunk_tokens: int = 16384
    """The output layer and cross entropy run on this many tokens at a time and are recomputed in
    backward, so a 1M-token sequence's logits (256 KB/token in fp16 for Llama 3) never exist at once."""

    device: Optional[Literal["cpu", "cuda"]] = None
    """Force a device; None = CUDA when available."""

    peak_tflops: Optional[float] = None
    """Per-device peak bf16 TFLOP/s for MFU (H100 SXM: 989); None = not reported."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval", "loss_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: expected >= 1")
        if self.save_interval < 0:
            raise ValueError(f"train.save_interval={self.save_interval}: expected >= 0")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps={self.max_bad_steps}: expected >= 1")
        for name in ("keep_last", "keep_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: expected >= 1 or null")
        if self.exit_duration_minutes is not None and self.exit_duration_minutes <= 0:
            raise ValueError(f"train.exit_duration_minutes={self.exit_duration_minutes}: expected > 0 or null")
        for name in self.exit_signals:
            if name not in _EXIT_SIGNALS:
                raise ValueError(f"train.exit_signals: {name!r} is not one of {sorted(_EXIT_SIGNALS)}")

    @property
    def load_dir(self) -> Optional[str]:
        """Where to resume from: train.load, else train.save."""
        return self.load if self.load is not None else self.save


@dataclass(frozen=True)
class TrainConfig:
    """Everything tools/train.py needs."""

    data: DataSection
    """Datasets and sample layout."""

    model: ModelSection = field(default_factory=ModelSection)
    """Architecture, initial weights, context extension."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP x PP x CP x DP (DP = world / (TP x PP x CP))."""

    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and LR schedule."""

    train: TrainSection = field(default_factory=TrainSection)
    """Loop, checkpoints, logging."""

    def __post_init__(self) -> None:
        if self.train.override_schedule and self.train.load_dir is None:
            raise ValueError("train.override_schedule=true needs train.load (or train.save) to resume from: "
                             "there is no checkpoint schedule to override")
        if self.optim.warmup_steps and self.optim.warmup_steps >= self.train.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} must be < train.steps={self.train.steps} "
                "(the schedule decays over train.steps after the warmup)"
            )
        cp = self.parallel.context_parallel
        if self.data.seq_length % (2 * cp):
            raise ValueError(
                f"data.seq_length={self.data.seq_length} is not divisible by 2 x parallel.context_parallel"
                f" = {2 * cp} (the load-balanced CP layout cuts each sequence into 2 x CP chunks)"
            )

    def check_world(self, world_size: int) -> int:
        """Check the layout against the world; returns DP and the gradient-accumulation steps."""
        dp = self.parallel.data_parallel_size(world_size)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"micro_batch_size x DP = {self.train.micro_batch_size} x {dp}"
            )
        return dp


_RENAMED = {
    ("model", "yarn_target_length"): "model.yarn.target",
    ("model", "yarn_original_length"): "model.yarn.original",
    ("model", "yarn_beta_fast"): "model.yarn.beta_fast",
    ("model", "yarn_beta_slow"): "model.yarn.beta_slow",
}
"""Keys of earlier releases -> their names now (refused with the new name, never silently mapped)."""


def load_train_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Read YAML (optional) and apply `key.sub=value` overrides."""
    data = apply_overrides(load_yaml(path) if path else {}, overrides)
    for (section, key), new in _RENAMED.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ValueError(f"{section}.{key} was renamed {new} (the YaRN settings are spelled as in "
                             "model/config.py ContextExtension: model.yarn: {target, original, beta_fast, beta_slow})")
    return from_dict(TrainConfig, data)
