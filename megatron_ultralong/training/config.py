"""The training configuration: one YAML file plus `key.sub=value` overrides (tools/train.py).

Every field is declared here with a docstring; sections validate themselves and raise ValueError
naming the field. Values the UltraLong paper does not confirm (RECIPE.md §7: schedule, warmup,
betas, batch for 1M/2M) are fields with neutral defaults, set explicitly in examples/ recipes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_ultralong.config_io import apply_overrides, from_dict, load_yaml
from megatron_ultralong.parallel.config import ParallelConfig


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

    yarn_target_length: Optional[int] = None
    """Context extension: replace the RoPE scaling by YaRN with factor = target / yarn_original_length
    (UltraLong: 1048576, 2097152, 4194304) and set max_position_embeddings to the target."""

    yarn_original_length: int = 8192
    """YaRN's original context (Llama 3's 8K pre-training length, per the paper)."""

    yarn_beta_fast: float = 32.0
    """YaRN beta_fast (the paper's beta = 4; HF's default 32)."""

    yarn_beta_slow: float = 1.0
    """YaRN beta_slow (the paper's alpha = 1)."""

    params_dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter and activation dtype (bf16 with fp32 main weights in the optimizer on GPU)."""

    use_transformer_engine: Optional[bool] = None
    """Layer spec with TE modules; None = when importable."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: selective = core attention only; full = whole layers (GPU only:
    megatron-core's checkpoint saves CUDA RNG states)."""

    recompute_num_layers: int = 1
    """With full recompute: layers per recompute chunk (uniform method)."""

    def __post_init__(self) -> None:
        if self.hf_checkpoint and self.megatron_checkpoint:
            raise ValueError("model.hf_checkpoint and model.megatron_checkpoint are mutually exclusive")
        if self.yarn_target_length is not None and self.yarn_target_length <= self.yarn_original_length:
            raise ValueError(
                f"model.yarn_target_length={self.yarn_target_length} must exceed "
                f"model.yarn_original_length={self.yarn_original_length}"
            )
        if self.recompute_num_layers < 1:
            raise ValueError(f"model.recompute_num_layers={self.recompute_num_layers}: expected >= 1")


@dataclass(frozen=True)
class DataSection:
    """Where samples come from."""

    kind: Literal["pretrain", "sft"] = "pretrain"
    """pretrain: Megatron indexed datasets packed to seq_length; sft: chat JSONL (assistant-only loss)."""

    paths: tuple[str, ...] = ()
    """pretrain: indexed-dataset prefixes (path without .bin/.idx); sft: chat JSONL files."""

    weights: Optional[tuple[float, ...]] = None
    """Blend weights, one per path (default: equal)."""

    seq_length: int = 1024
    """Tokens per sample (1M/2M/4M in the recipe). Must divide by 2 x CP."""

    tokenizer: Optional[str] = None
    """HF tokenizer directory or tokenizer.json (sft: renders the chat template)."""

    eod_token_id: Optional[int] = None
    """Document separator id in the indexed data (needed for the document mask / position reset)."""

    pad_token_id: int = 0
    """Padding id for samples shorter than seq_length (masked out of the loss)."""

    document_mask: bool = False
    """Block attention across documents (the recipe trains WITHOUT it: cross-document attention)."""

    reset_position_ids: bool = False
    """Restart RoPE positions at each document (off in the recipe)."""

    cache_dir: Optional[str] = None
    """Where megatron-core caches sample indices (default: next to the first dataset)."""

    chat_format: Literal["llama3.1", "llama3"] = "llama3.1"
    """sft: chat rendering (llama3.1 adds Meta's default system block, as its template does)."""

    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """sft: what to do with a conversation longer than seq_length (counted in the dataset stats)."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("data.paths is empty: give at least one dataset")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths"
            )
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ValueError(f"data.weights={list(self.weights)}: every weight must be > 0")
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length}: expected >= 2")
        if self.kind == "pretrain" and (self.document_mask or self.reset_position_ids) and self.eod_token_id is None:
            # SFT rows carry their conversation boundaries; packed pretraining data finds documents
            # by their closing separator token.
            raise ValueError("data.document_mask / data.reset_position_ids need data.eod_token_id")


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

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: expected >= 0")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad}: expected >= 0")


@dataclass(frozen=True)
class TrainSection:
    """The loop: batch, steps, checkpoints, logs."""

    steps: int = 10
    """Optimizer steps to train (UltraLong: 480 / 140 / 150 for 1M / 2M / 4M)."""

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
    """Resume from the latest complete checkpoint here (model, optimizer, scheduler, RNG, data)."""

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


def load_train_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Read YAML (optional) and apply `key.sub=value` overrides."""
    data = load_yaml(path) if path else {}
    return from_dict(TrainConfig, apply_overrides(data, overrides))
