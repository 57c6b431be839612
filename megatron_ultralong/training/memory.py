"""The one memory and step-time model: per-GPU bytes by component, and seconds per step from FLOPs.

The trainer logs it at start-up, benchmarks/memory_plan.py prints the tables of
docs/parallelism_plan.md from it, and a dry run calls `estimate_memory` / `estimate_step_time`.

Saved activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, §4). Their per-layer count for GPT, sbh(34 + 5as/h) bytes, lists each
tensor a layer keeps for backward. For a Llama layer (RMSNorm, no dropout, SwiGLU, GQA, a flash
kernel that keeps no s x s matrix), per token, with e bytes per activation, h hidden, hq = nq*d
query width, hkv = nkv*d KV width, F the FFN width:

    norm inputs      2 * h*e   (+ fp32 rstd)   both RMSNorms keep their input (the residual stream)
    norm outputs     2 * h*e                   the QKV and fc1 GEMMs keep their input
    q, k, v          (hq + 2 hkv)*e            kept by the attention kernel (after RoPE)
    attention out    hq*e                      kernel output = linear_proj's input (one tensor)
    lse              4*nq                      fp32, kept by the kernel
    fc1 out          2F*e                      gate and up, SwiGLU's input
    SwiGLU out       F*e                       fc2's input
    total, Llama-3.1-8B, e = 2:  32,768 + 12,288 + 8,192 + 128 + 57,344 + 28,672 = 139,392 B (+8 rstd)

What this implementation keeps beyond that minimal set (measured on CPU, tests/test_memory_model.py):
    rope cos/sin     4*d*e                     megatron's unfused RoPE (rope fusion is off: it cannot
                                               apply YaRN's attention factor) builds cos and sin for q
                                               and for k in every layer, and its multiplies keep them;
                                               not split by TP: 1,024 B per token per layer for the 8B.
Two more were removed in attention/: the value view pinned the whole fused QKV output
(core_attention.py makes it contiguous), and the CP output was stored [b, h, s, d] so linear_proj
kept a second, [s, b, h*d] copy (softmax_merge.final_output stores it in Megatron's order).

Korthikanti's tensor parallelism divides everything but the norm/residual tensors by t; sequence
parallelism divides those too (megatron's column-parallel GEMM keeps its sequence-sharded input and
re-gathers it in backward). So at TP 8 with SP: 139,400 / 8 = 17,425 B per token per layer, and
18,449 with the RoPE tensors above.

Recompute, as megatron-core 0.16.1 implements it (`recompute_granularity`, `recompute_modules`):
    selective "core_attn"  drops only the lse: q, k, v stay (the checkpoint's inputs) and the
                           attention output stays (linear_proj's input); the attention forward reruns.
    selective "layernorm"  drops both norm outputs (CheckpointWithoutOutput).
    selective "mlp"        drops fc1 out and SwiGLU out (the MLP is re-run from its input).
    full                   keeps each chunk's input, 2h*e per layer chunk, and re-runs whole layers.
Hence the two figures once given for selective at TP8+SP: 17,424 B/token/layer is megatron's
selective with ["core_attn"] over the minimal set (the lse is 16 B of it: "none" minus 16 B), the
right figure for what the trainer ran; 2,064 B (= (2h + hq)*e/8 + lse) described a mode
megatron-core does not offer (keep only the layer input and the attention output). With the RoPE
tensors this implementation keeps: core_attn 18,433, ["layernorm", "mlp"] 5,649 B at TP8+SP.

Beyond the saved set, the backward of a layer holds its transient gradients (the MLP's are the
largest: 3F*e per token) and, with full recompute, one re-run chunk's whole saved set.

Everything else: bf16 weights, fp32 main gradients (megatron DDP with grad_reduce_in_fp32), fp32
master weights + Adam m, v = 12 B/param sharded over DP x CP by the distributed optimizer (CPU:
torch AdamW, 12 B/param unsharded); chunked cross entropy's fp32 logits, softmax and gradient for
`loss_chunk_tokens` tokens; and the CP attention buffers of one layer at a time (`cp_buffer_bytes`).
Not modelled: allocator fragmentation, NCCL and CUDA-context memory (the callers add a margin).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import torch

from megatron_ultralong.model.config import LlamaConfig, load_model_config
from megatron_ultralong.training.metrics import matmul_params, training_flops_per_token

RECOMPUTE_LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ()),
    ("selective", ("layernorm",)),
    ("selective", ("layernorm", "mlp")),
    ("full", ()),
)
"""Recompute settings from cheapest to most memory-saving (`choose_recompute` walks it)."""


@dataclass(frozen=True)
class Layout:
    """How one training run is laid out: everything the estimate needs besides the architecture."""

    seq_length: int
    """Tokens per sequence (global, before CP sharding)."""
    tp: int = 1
    """Tensor-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (the first stage, which holds the most activations, is estimated)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    global_batch_size: int = 1
    """Sequences per optimizer step (for the step time)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (norm/residual activations split over TP)."""
    cp_comm_type: str = "p2p"
    """"p2p" (ring), "all_gather" or "a2a"."""
    recompute: str = "none"
    """"none", "selective" or "full"."""
    recompute_modules: tuple[str, ...] = ()
    """With selective: any of "core_attn", "layernorm", "mlp"."""
    recompute_num_layers: int = 1
    """With full: layers per recompute chunk."""
    loss_chunk_tokens: int = 16384
    """Tokens per chunk of the output layer + cross entropy."""
    act_bytes: int = 2
    """Bytes per activation/weight element (bf16: 2; fp32: 4)."""
    distributed_optimizer: bool = True
    """megatron-core's distributed optimizer (GPU runs); False: torch AdamW on every rank (CPU)."""
    fused_kernels: bool = True
    """GPU: RMSNorm and SwiGLU are fused kernels that keep only their inputs (+ rstd). False (CPU):
    PyTorch's composite RMSNorm also keeps x * rstd, and the unfused SwiGLU keeps silu(gate) and
    its product, h*e per norm and 2F*e per MLP more."""

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def local_tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.micro_batch_size * self.seq_length // self.cp

    @classmethod
    def from_train_config(cls, cfg, world_size: int) -> "Layout":
        """From a resolved `training.config.TrainConfig` and the world size (DP = what remains)."""
        p, m, t = cfg.parallel, cfg.model, cfg.train
        return cls(
            seq_length=cfg.data.seq_length, tp=p.tensor_parallel, cp=p.context_parallel,
            dp=p.data_parallel_size(world_size), pp=p.pipeline_parallel, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, sequence_parallel=p.sequence_parallel,
            cp_comm_type=p.cp_comm_type, recompute=m.recompute,
            recompute_modules=tuple(m.recompute_modules) if m.recompute == "selective" else (),
            recompute_num_layers=m.recompute_num_layers, loss_chunk_tokens=t.loss_chunk_tokens,
            act_bytes=2 if m.params_dtype == "bfloat16" else 4, distributed_optimizer=t.device != "cpu",
            fused_kernels=t.device != "cpu",
        )


def layer_saved_bytes(cfg: LlamaConfig, lay: Layout) -> dict[str, float]:
    """Bytes one layer keeps for backward per local token on one TP rank, by tensor (module docstring)."""
    e, t = lay.act_bytes, lay.tp
    h, hq, hkv, f = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    norm_div = t if lay.sequence_parallel else 1
    if lay.recompute == "full":
        return {"layer input": h * e / norm_div / lay.recompute_num_layers}
    drop = set(lay.recompute_modules) if lay.recompute == "selective" else set()
    parts = {
        "norm inputs": (2 * h * e + 2 * 4) / norm_div,
        "norm outputs": 0.0 if "layernorm" in drop else 2 * h * e / norm_div,
        "q, k, v": (hq + 2 * hkv) * e / t,
        "attention out": hq * e / t,
        "lse": 0.0 if "core_attn" in drop else 4 * cfg.num_attention_heads / t,
        "rope cos/sin": 4 * cfg.head_dim * e,
        "fc1 out": 0.0 if "mlp" in drop else 2 * f * e / t,
        "swiglu out": 0.0 if "mlp" in drop else f * e / t,
    }
    if not lay.fused_kernels:
        parts["unfused norm/swiglu"] = 2 * h * e / norm_div + (0.0 if "mlp" in drop else 2 * f * e / t)
    return parts


def activation_bytes_per_token_per_layer(cfg: LlamaConfig, lay: Layout) -> float:
    return sum(layer_saved_bytes(cfg, lay).values())


def backward_working_bytes_per_token(cfg: LlamaConfig, lay: Layout) -> float:
    """Transient bytes per local token during one layer's backward: the MLP's gradients (3F*e / t),
    plus, with full recompute, the re-run chunk's whole saved set."""
    # The peak of a backward is in the last layer's SwiGLU backward. Fused: d(fc2 input) F*e ->
    # d(fc1 out) 2F*e. Unfused (CPU), measured with the allocator's own events: MulBackward of
    # silu(gate) * up holds the incoming F*e and both input gradients (2F*e), 3F*e again; its
    # later steps free the incoming gradient first. By then the final norm's and fc2's saved
    # inputs are already freed, so activations + this is an upper bound (~7% over on CPU).
    transient = 3 * cfg.ffn_hidden_size * lay.act_bytes / lay.tp
    if lay.recompute == "full":
        rerun = replace(lay, recompute="none", recompute_modules=())
        transient += lay.recompute_num_layers * activation_bytes_per_token_per_layer(cfg, rerun)
    return transient


def cp_buffer_bytes(cfg: LlamaConfig, lay: Layout) -> float:
    """Peak bytes of one layer's CP attention buffers (attention/ring.py, all_gather.py, all_to_all.py).

    Per local token, e = activation bytes, widths per TP rank (hq, hkv, nq):
      p2p backward (> forward): dQ fp32 4hq; K/V current + arriving 2*2hkv*e; fp32 dK/dV of the
          current block, the one in flight and the rank's own 3*2hkv*4; kernel outputs (hq+2hkv)*e.
      all_gather backward, phases in order (K/V over the whole sequence = cp x local):
          gather: gathered K/V + its natural-order copy 2 * cp*2hkv*e;
          attention: natural K/V cp*2hkv*e + fp32 dK/dV cp*2hkv*4 + kernel dK/dV up to cp*2hkv*e;
          reduce-scatter: fp32 dK/dV + its rank-ordered stacked copy 2 * cp*2hkv*4;
          plus dQ fp32 4hq throughout.
      a2a: the re-sharded q, k, v and output sent + received 2*(2hq+2hkv)*e, fp32 output/lse
          accumulators 4hq + 4nq, fp32 dQ/dK/dV 4(hq+2hkv).
    """
    if lay.cp == 1:
        return 0.0
    e, t, cp = lay.act_bytes, lay.tp, lay.cp
    hq, hkv, nq = cfg.num_attention_heads * cfg.head_dim / t, cfg.num_kv_heads * cfg.head_dim / t, cfg.num_attention_heads / t
    if lay.cp_comm_type == "p2p":
        per_token = 4 * hq + 2 * 2 * hkv * e + 3 * 2 * hkv * 4 + (hq + 2 * hkv) * e
    elif lay.cp_comm_type == "all_gather":
        kv_full = cp * 2 * hkv
        per_token = 4 * hq + max(2 * kv_full * e, kv_full * e + kv_full * 4 + kv_full * e, 2 * kv_full * 4)
    elif lay.cp_comm_type == "a2a":
        per_token = 2 * (2 * hq + 2 * hkv) * e + 4 * hq + 4 * nq + 4 * (hq + 2 * hkv)
    else:
        raise ValueError(f"cp_comm_type={lay.cp_comm_type!r}: expected 'p2p', 'all_gather' or 'a2a'")
    return per_token * lay.local_tokens


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by component (the first pipeline stage)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    """Saved activations of all local layers + the final norm."""
    backward_working_set: float
    """Transient gradients of one layer (+ one re-run chunk with full recompute)."""
    cp_buffers: float
    logits: float
    """fp32 logits, softmax and gradient of one loss chunk."""

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def parameter_count(cfg: LlamaConfig) -> int:
    """All weights: matmuls (LM head included), the embedding if untied, the RMSNorm gains."""
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return matmul_params(cfg) + embed + (2 * cfg.num_layers + 1) * cfg.hidden_size


def estimate_layout(cfg: LlamaConfig, lay: Layout) -> MemoryEstimate:
    """The per-GPU estimate for an architecture and a layout."""
    local_params = parameter_count(cfg) / (lay.tp * lay.pp)
    optimizer = local_params * 12 / (lay.dp * lay.cp) if lay.distributed_optimizer else local_params * 12
    tokens, e = lay.local_tokens, lay.act_bytes
    layers = -(-cfg.num_layers // lay.pp)
    norm_div = lay.tp if lay.sequence_parallel else 1
    final_norm = 2 * cfg.hidden_size * e / norm_div  # its input and output (the loss chunks' input)
    chunk = min(lay.loss_chunk_tokens, tokens)
    return MemoryEstimate(
        weights=local_params * e,
        grads=local_params * 4,
        optimizer=optimizer,
        activations=tokens * (layers * activation_bytes_per_token_per_layer(cfg, lay) + final_norm),
        backward_working_set=tokens * backward_working_bytes_per_token(cfg, lay),
        cp_buffers=cp_buffer_bytes(cfg, lay),
        logits=chunk * cfg.vocab_size / lay.tp * 4 * 3,
    )


def _model_config(cfg, model_cfg: Optional[LlamaConfig]) -> LlamaConfig:
    # Context extension changes RoPE only, never a shape: the preset/HF config is enough.
    return model_cfg if model_cfg is not None else load_model_config(cfg.model.config)


def estimate_memory(cfg, world_size: int, model_cfg: Optional[LlamaConfig] = None) -> MemoryEstimate:
    """Per-GPU memory of a resolved `TrainConfig` on `world_size` ranks, by component (bytes)."""
    return estimate_layout(_model_config(cfg, model_cfg), Layout.from_train_config(cfg, world_size))


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
    if lay.recompute == "full":
        per_layer = mlp + core_attn + attn_proj
    elif lay.recompute == "selective":
        per_layer = ("mlp" in lay.recompute_modules) * mlp + ("core_attn" in lay.recompute_modules) * core_attn
    else:
        per_layer = 0
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
    return estimate_layout_step_time(_model_config(cfg, model_cfg), Layout.from_train_config(cfg, world_size), peak, mfu)


def choose_recompute(cfg: LlamaConfig, lay: Layout, budget_bytes: float,
                     ladder: Sequence[tuple[str, tuple[str, ...]]] = RECOMPUTE_LADDER) -> Optional[Layout]:
    """The cheapest recompute setting whose total fits `budget_bytes`, or None if none fits."""
    for mode, modules in ladder:
        candidate = replace(lay, recompute=mode, recompute_modules=modules)
        if estimate_layout(cfg, candidate).total <= budget_bytes:
            return candidate
    return None


def device_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    return float("nan")


def estimate_memory_per_device(model_cfg: LlamaConfig, train_cfg, dp: int) -> MemoryEstimate:
    """The trainer's call: `estimate_memory` with the world rebuilt from DP."""
    p = train_cfg.parallel
    world = dp * p.tensor_parallel * p.context_parallel * p.pipeline_parallel
    return estimate_memory(train_cfg, world, model_cfg)


def format_estimate(e: MemoryEstimate, device: torch.device) -> str:
    unit, scale = ("GiB", 2**30) if e.total >= 2**30 else ("MiB", 2**20)
    parts = ", ".join(f"{name} {value / scale:.2f}" for name, value in e.as_dict().items() if name != "total")
    return (
        f"[train] memory estimate per device: {e.total / scale:.2f} {unit} ({parts}) of "
        f"{device_memory_bytes(device) / 2**30:.1f} GiB on {device}"
    )
