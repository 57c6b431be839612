"""The one HF Llama <-> Megatron-Core key map, with the tensor layouts and TP sharding rules.

Layouts (megatron-core `attention.py::get_query_key_value_tensors` and `mlp.py` glu; Megatron-Bridge
`param_mapping.py`; H hidden, nh heads, ng KV groups, d head dim, F ffn, t TP size):
- linear_qkv [(nh + 2 ng) d, H]: per query group g, its nh/ng query heads, then k head g, then
  v head g. TP splits contiguously along dim 0, so each rank holds ng/t whole groups.
- linear_fc1 [2F, H] = [gate; up] globally; each TP rank holds [gate_r; up_r] (NOT a contiguous
  slice of the global tensor), because Megatron's SwiGLU halves the *local* output.
- linear_proj / linear_fc2: HF's [out, in]; TP splits dim 1 (row-parallel).
- embedding / output: [padded vocab, H]; zero rows appended on import (Megatron-Bridge's choice:
  they receive no gradient through the embedding and are truncated on export); TP splits dim 0.
- RMSNorm weights are copied as is; HF's rotary inv_freq buffers are derived, never mapped.

Megatron names depend on the layer spec: with Transformer Engine the norms live inside the fused
linears (`linear_qkv.layer_norm_weight`), with the local spec they are modules of their own
(`input_layernorm.weight`). Rules carry both spellings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megatron_ultralong.model.config import LlamaConfig

KINDS = ("replicated", "column", "row", "vocab", "qkv", "fc1")


@dataclass(frozen=True)
class KeyRule:
    """One Megatron parameter and the HF tensor(s) it is made of."""

    megatron: str
    """Megatron name (local spec); `{i}` is the global layer index."""

    hf: tuple[str, ...]
    """HF name(s); several for fused tensors (q, k, v) and (gate, up)."""

    kind: str
    """How it is fused and TP-sharded: one of KINDS."""

    hf_shapes: tuple[str, ...] = ()
    """Each HF tensor's shape in dimension letters (`hf_dims`): "QH" = [nh d, H]."""

    megatron_te: Optional[str] = None
    """The name under the Transformer Engine spec when it differs."""


def hf_dims(cfg: LlamaConfig) -> dict[str, int]:
    """The dimension letters of `KeyRule.hf_shapes` for an architecture."""
    return {"V": cfg.vocab_size, "H": cfg.hidden_size, "F": cfg.ffn_hidden_size,
            "Q": cfg.num_attention_heads * cfg.head_dim, "K": cfg.num_kv_heads * cfg.head_dim}


RULES: tuple[KeyRule, ...] = (
    KeyRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", ("VH",)),
    KeyRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated", ("H",)),
    KeyRule("output_layer.weight", ("lm_head.weight",), "vocab", ("VH",)),
    KeyRule(
        "decoder.layers.{i}.input_layernorm.weight",
        ("model.layers.{i}.input_layernorm.weight",),
        "replicated",
        ("H",),
        megatron_te="decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
    ),
    KeyRule(
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
        "qkv",
        ("QH", "KH", "KH"),
    ),
    KeyRule(
        "decoder.layers.{i}.self_attention.linear_proj.weight",
        ("model.layers.{i}.self_attn.o_proj.weight",),
        "row",
        ("HQ",),
    ),
    KeyRule(
        "decoder.layers.{i}.pre_mlp_layernorm.weight",
        ("model.layers.{i}.post_attention_layernorm.weight",),
        "replicated",
        ("H",),
        megatron_te="decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
    ),
    KeyRule(
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        "fc1",
        ("FH", "FH"),
    ),
    KeyRule(
        "decoder.layers.{i}.mlp.linear_fc2.weight",
        ("model.layers.{i}.mlp.down_proj.weight",),
        "row",
        ("HF",),
    ),
)
EMBEDDING, OUTPUT = RULES[0], RULES[2]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_MEGATRON_PATTERNS = [
    (_pattern(name), rule) for rule in RULES for name in {rule.megatron, rule.megatron_te} if name
]


def rule_for_megatron_name(name: str) -> tuple[KeyRule, Optional[int]]:
    """The rule for a Megatron name (either spec's spelling) and the layer index in it, if any."""
    for pattern, rule in _MEGATRON_PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, int(m.group(1)) if m.groups() else None
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def hf_names(rule: KeyRule, layer: Optional[int]) -> tuple[str, ...]:
    return tuple(n.format(i=layer) for n in rule.hf)


def tied_output(rule: KeyRule, cfg: LlamaConfig) -> bool:
    """True for a tied model's output layer: the one tied-embedding special case of the converters.

    A tied model's last PP stage keeps its own copy of the embedding as the output layer, so the
    copy is read from `model.embed_tokens.weight` on import and not written on export; an HF
    checkpoint that stores `lm_head.weight` anyway must hold an identical copy."""
    return rule is OUTPUT and cfg.tie_word_embeddings


def hf_tensors(rule: KeyRule, layer: Optional[int], cfg: LlamaConfig, export: bool = False) -> tuple[str, ...]:
    """The HF tensors a Megatron parameter is read from (export=False) or written to (export=True)."""
    if tied_output(rule, cfg):
        return () if export else hf_names(EMBEDDING, None)
    return hf_names(rule, layer)


def expected_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this architecture holds -> its shape, from `RULES`."""
    dims = hf_dims(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for rule in RULES:
        layers = range(cfg.num_layers) if "{i}" in rule.megatron else [None]
        for i in layers:
            names = hf_tensors(rule, i, cfg, export=True)
            out.update((n, tuple(dims[c] for c in shape)) for n, shape in zip(names, rule.hf_shapes))
    return out


# ------------------------------------------------------------------- fusing (TP-agnostic tensors)
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: LlamaConfig) -> Tensor:
    """HF q [nh d, H], k/v [ng d, H] -> Megatron grouped linear_qkv [(nh + 2 ng) d, H]."""
    nh, ng, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    _expect_shape("q_proj", q, (nh * d, cfg.hidden_size))
    _expect_shape("k_proj", k, (ng * d, cfg.hidden_size))
    _expect_shape("v_proj", v, (ng * d, cfg.hidden_size))
    hidden = q.shape[-1]
    q = q.reshape(ng, nh // ng * d, hidden)
    k = k.reshape(ng, d, hidden)
    v = v.reshape(ng, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: Tensor, cfg: LlamaConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `fuse_qkv`."""
    nh, ng, d = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    _expect_shape("linear_qkv", qkv, ((nh + 2 * ng) * d, cfg.hidden_size))
    grouped = qkv.reshape(ng, (nh // ng + 2) * d, -1)
    q, k, v = torch.split(grouped, [nh // ng * d, d, d], dim=1)
    hidden = qkv.shape[-1]
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def fuse_fc1(gate: Tensor, up: Tensor, cfg: LlamaConfig) -> Tensor:
    _expect_shape("gate_proj", gate, (cfg.ffn_hidden_size, cfg.hidden_size))
    _expect_shape("up_proj", up, (cfg.ffn_hidden_size, cfg.hidden_size))
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: Tensor, cfg: LlamaConfig) -> tuple[Tensor, Tensor]:
    _expect_shape("linear_fc1", fc1, (2 * cfg.ffn_hidden_size, cfg.hidden_size))
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def pad_vocab(weight: Tensor, padded_vocab: int) -> Tensor:
    """Append zero rows up to the padded vocabulary."""
    if weight.shape[0] > padded_vocab:
        raise ValueError(f"vocab rows {weight.shape[0]} exceed the padded vocabulary {padded_vocab}")
    if weight.shape[0] == padded_vocab:
        return weight
    pad = weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


# ------------------------------------------------------------------- TP sharding
def shard_tp(kind: str, full: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's slice of a TP-agnostic (fused, padded) Megatron tensor."""
    if kind == "replicated" or tp_size == 1:
        return full
    if kind in ("column", "vocab", "qkv"):
        return _chunk(full, tp_size, 0)[tp_rank]
    if kind == "row":
        return _chunk(full, tp_size, 1)[tp_rank]
    if kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([_chunk(gate, tp_size, 0)[tp_rank], _chunk(up, tp_size, 0)[tp_rank]], dim=0)
    raise ValueError(f"unknown tensor kind {kind!r}; expected one of {KINDS}")


def unshard_tp(kind: str, shards: list[Tensor]) -> Tensor:
    """Inverse of `shard_tp` given every rank's slice, in TP-rank order."""
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind in ("column", "vocab", "qkv"):
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown tensor kind {kind!r}; expected one of {KINDS}")


def _chunk(t: Tensor, parts: int, dim: int) -> tuple[Tensor, ...]:
    if t.shape[dim] % parts:
        raise ValueError(f"dim {dim} of size {t.shape[dim]} is not divisible by TP={parts}")
    return t.chunk(parts, dim=dim)


def _expect_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(shape)}")
