"""Per-device memory estimate printed at start-up, next to the device's memory.

The arithmetic follows PERFORMANCE.md §9 (Llama-3.1-8B: 139,392 B saved per token per layer with
no recompute, flash attention, bf16), generalised to any Llama config and divided by TP (sequence
parallelism splits the norm/residual activations too). It is an estimate: allocator slack, NCCL
buffers and fragmentation are not modelled (keep ~10% headroom).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.training.metrics import matmul_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by component."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    logits_chunk: float
    cp_kv_buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits_chunk + self.cp_kv_buffers


def activation_bytes_per_token_per_layer(
    cfg: LlamaConfig, recompute: str, tp: int, sequence_parallel: bool, act_bytes: int = 2
) -> float:
    """Saved activations of one layer for one token on one TP rank.

    The residual/norm tensors (4 h) are split over TP only with sequence parallelism; QKV, the
    attention output and the MLP tensors always are. "selective" is megatron-core's: core
    attention recomputed, which with a flash kernel (saves q, k, v, out, lse anyway) keeps almost
    the same set as "none"; "full" keeps each layer's input only.
    """
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    nq, nkv = cfg.num_attention_heads, cfg.num_kv_heads
    norm_div = tp if sequence_parallel else 1
    if recompute == "full":
        return act_bytes * h / norm_div  # the layer input only
    split = act_bytes * ((nq + 2 * nkv) * d + nq * d + 3 * f) + 4 * nq  # q,k,v, out, MLP, lse
    return act_bytes * 4 * h / norm_div + split / tp


def estimate_memory_per_device(cfg: LlamaConfig, train_cfg, dp: int) -> MemoryEstimate:
    """train_cfg: TrainConfig. Distributed optimizer (GPU) shards master weights and Adam over DP x CP."""
    p = train_cfg.parallel
    tp, cp = p.tensor_parallel, p.context_parallel
    bf16 = train_cfg.model.params_dtype == "bfloat16"
    embed = cfg.vocab_size * cfg.hidden_size
    # matmul_params counts the LM head; an untied model has a separate embedding table too.
    params = matmul_params(cfg) + (0 if cfg.tie_word_embeddings else embed) + (2 * cfg.num_layers + 1) * cfg.hidden_size
    local_params = params / tp
    weight_bytes = 2 if bf16 else 4
    weights = local_params * weight_bytes
    grads = local_params * 4  # fp32 main_grad buffers
    optimizer = local_params * (12 if bf16 else 8) / (dp * cp)
    local_tokens = train_cfg.train.micro_batch_size * train_cfg.data.seq_length / cp
    sp = p.sequence_parallel
    per_token = activation_bytes_per_token_per_layer(cfg, train_cfg.model.recompute, tp, sp, weight_bytes)
    activations = local_tokens * cfg.num_layers * per_token
    if train_cfg.model.recompute == "full":
        # plus one layer recomputed at a time with its full saved set
        activations += local_tokens * activation_bytes_per_token_per_layer(cfg, "none", tp, sp, weight_bytes)
    chunk = min(train_cfg.train.loss_chunk_tokens, local_tokens)
    logits_chunk = chunk * cfg.vocab_size / tp * 4 * 3  # fp32 logits, softmax and grad of one chunk
    kv_local = local_tokens * 2 * cfg.num_kv_heads * cfg.head_dim * weight_bytes / tp
    cp_kv = 0.0 if cp == 1 else (2 * kv_local if p.cp_comm_type == "p2p" else cp * kv_local)
    return MemoryEstimate(weights, grads, optimizer, activations, logits_chunk, cp_kv)


def device_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    return float("nan")


def format_estimate(e: MemoryEstimate, device: torch.device) -> str:
    unit, scale = ("GiB", 2**30) if e.total >= 2**30 else ("MiB", 2**20)
    parts = ", ".join(
        f"{name} {getattr(e, name) / scale:.2f}"
        for name in ("weights", "grads", "optimizer", "activations", "logits_chunk", "cp_kv_buffers")
    )
    return (
        f"[train] memory estimate per device: {e.total / scale:.2f} {unit} ({parts}) of "
        f"{device_memory_bytes(device) / 2**30:.1f} GiB on {device}"
    )
