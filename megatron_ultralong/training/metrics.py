"""Throughput arithmetic for the training log: FLOPs per token with causal attention counted right.

Model training FLOPs per token (Chowdhery et al. 2022, arXiv 2204.02311, App. B, with causal attention halved) = 6 N_matmul + 6 L d s, where N_matmul counts
the weights of every matmul (QKV, output projection, MLP, LM head; not the embedding lookup), L
layers, d = heads x head_dim, s the sequence length. Causal attention is half the s x s matrix:
QK^T and PV each 2 s d per token forward, x3 for training -> 6 L d s. (NeMo/Bridge count the full
matrix, 12 L d s, which doubles attention at 1M tokens.) Recompute is not counted: MFU is model FLOPs.
"""
from __future__ import annotations

from megatron_ultralong.model.config import LlamaConfig


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that take part in a matmul per token (the LM head included)."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * d + cfg.num_attention_heads * d * h
    mlp = 3 * h * cfg.ffn_hidden_size
    return cfg.num_layers * (attn + mlp) + cfg.vocab_size * h


def training_flops_per_token(cfg: LlamaConfig, seq_length: int) -> float:
    """6 N_matmul + 6 L d s (causal attention)."""
    attn_width = cfg.num_attention_heads * cfg.head_dim
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.num_layers * attn_width * seq_length
