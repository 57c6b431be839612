"""The plugin's module for the `core_attention` slot of Megatron-Core's `SelfAttention`.

Megatron-Core's own `DotProductAttention` asserts context_parallel_size == 1 and materialises the
full [b, np, sq, sk] score matrix; its CP path exists only inside Transformer Engine. This module
keeps Megatron-Core's constructor and forward signatures, so it drops into a layer spec in place of
either, and computes attention with a kernel that never materialises the scores.

Context parallelism: when the CP group (`pg_collection.cp`) has more than one rank, q/k/v hold this
rank's zigzag chunks (parallel/cp_layout.py) and `cp_comm_type` picks the algorithm:
"p2p" (ring.py), "all_gather" (all_gather.py) or "a2a" (all_to_all.py). See docs/context_parallel.md.

Document masking (optional; the UltraLong recipe trains without it): pass
`PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu)` where `cu` [n_docs + 1] holds cumulative
document lengths over the b GLOBAL (unsharded) sequences of length S = s_local * cp concatenated,
from 0 to b*S, with a boundary at every sample start (segments.parse_cu_seqlens). It is replicated
on all CP ranks. qkv_format "sbhd" keeps Megatron's Attention off its THD path. At CP = 1 a
document-masked batch goes through ONE varlen kernel call per layer when the resolved backend has
one (flash-attn / FA3 `flash_attn_varlen_func`, kernels.varlen_kernel); otherwise ("sdpa", "cudnn")
through the ring code with one rank, one kernel call per document.

RoPE (including the YaRN attention factor, folded into `softmax_scale` by the model builder) is
applied by `SelfAttention` before this module is called, from global position ids sharded with
the same layout as the tokens; q/k/v arrive already rotated.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, get_args

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from megatron_ultralong.attention.all_gather import all_gather_attention
from megatron_ultralong.attention.all_to_all import check_a2a_heads, ulysses_attention
from megatron_ultralong.attention.comm import CommStats
from megatron_ultralong.attention.kernels import BACKENDS, AttentionBackend, varlen_kernel
from megatron_ultralong.attention.ring import ring_attention
from megatron_ultralong.attention.segments import DocBoundaries, document_boundaries
from megatron_ultralong.parallel.config import CpCommType

_ALGORITHMS = {"p2p": ring_attention, "all_gather": all_gather_attention, "a2a": ulysses_attention}
CP_ATTENTION: dict[str, Callable] = {name: _ALGORITHMS[name] for name in get_args(CpCommType)}
"""CP attention per `CpCommType` (a KeyError at import names a declared type without an algorithm)."""


class UltraLongCoreAttention(MegatronModule):
    """Causal scaled-dot-product attention over Megatron's [s, b, h, d] layout.

    Args mirror `megatron.core.transformer.dot_product_attention.DotProductAttention`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        backend: AttentionBackend = "auto",
    ):
        """Megatron's `CoreAttentionBuilder` keywords; `backend` comes from the layer spec
        (`get_ultralong_layer_spec(attention_backend=...)`)."""
        super().__init__(config=config)
        if backend not in BACKENDS:
            raise ValueError(f"attention backend={backend!r}: expected one of {BACKENDS}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: UltraLongCoreAttention supports only 0 "
                "(Llama trains without attention dropout)"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"attn_mask_type={attn_mask_type}: only causal or no_mask is supported")
        if pg_collection is None or not hasattr(pg_collection, "tp") or not hasattr(pg_collection, "cp"):
            raise ValueError(
                "UltraLongCoreAttention needs pg_collection with its tp and cp process groups "
                "(SelfAttention passes the model's; build it with build_model or pass one explicitly)"
            )
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        self.cp_group = pg_collection.cp
        self.cp_comm_type = self._resolve_cp_comm_type(cp_comm_type, config, self.layer_number)
        if self.cp_comm_type == "a2a" and self.cp_group.size() > 1:
            check_a2a_heads(self.num_heads, self.num_kv_heads, self.cp_group.size())
        self.backend = backend
        """Block kernel (kernels.AttentionBackend): "auto" (on CUDA half precision the first of FA3,
        cuDNN, flash-attn that passes a self-check, else PyTorch SDPA ops), or one of them by name."""
        self.comm_stats: Optional[CommStats] = None
        """Set to a CommStats to count the bytes this layer's CP attention sends (benchmarks)."""

    @staticmethod
    def _resolve_cp_comm_type(cp_comm_type: Optional[str], config: TransformerConfig, layer_number: int) -> str:
        """The constructor argument (Megatron passes the layer's entry), else the config's, else "p2p"."""
        value = cp_comm_type if cp_comm_type is not None else config.cp_comm_type
        if isinstance(value, (list, tuple)):  # per-layer list in TransformerConfig
            value = value[layer_number - 1]
        value = value or "p2p"
        if value not in CP_ATTENTION:
            hint = " (spelled 'all_gather')" if value == "allgather" else ""
            raise ValueError(f"cp_comm_type={value!r}{hint}: expected one of {tuple(CP_ATTENTION)}")
        return value

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] (GQA heads not repeated).

        With CP, sq = sk = S/cp local tokens in the zigzag layout. Returns the context
        [sq, b, np * hn]. `attention_mask` is ignored: causality comes from `attn_mask_type` and
        documents from `packed_seq_params`, never from a dense [s, s] mask (impossible at 1M tokens).
        """
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by UltraLongCoreAttention")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        sq, b = query.shape[:2]
        cp = self.cp_group.size()
        docs = None
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "sbhd":
                raise ValueError(
                    f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}: UltraLongCoreAttention "
                    "takes document boundaries with qkv_format='sbhd' (cu_seqlens over global sequences)"
                )
            cu, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
            if cu is None:
                raise ValueError("packed_seq_params.cu_seqlens_q is None: document masking needs it")
            docs = document_boundaries(cu, cu_kv, b, sq * cp)  # read from the device once per step
        # Megatron's value is a view into the fused QKV GEMM output (RoPE gives q and k their own
        # tensors): saved for backward as a view, it would keep the whole QKV output alive,
        # (hq + hkv) * e bytes per token more than its own g * d (training/memory.py).
        value = value.contiguous()
        # [s, b, h, d] -> [b, h, s, d] views.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        varlen = varlen_kernel(self.backend, q) if cp == 1 and docs is not None else None
        if cp == 1 and docs is None:
            # SDPA repeats the KV heads internally (enable_gqa); autograd gives the backward.
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
            )
        elif varlen is not None:
            # Packed documents at CP = 1: ONE varlen kernel call for the whole batch (and its own
            # backward), instead of a kernel call and merges per document.
            return self._packed_attention(varlen, query, key, value, cu, docs, causal)
        else:
            # cp == 1 with documents runs the ring code with one rank: no communication, same masking.
            attend = CP_ATTENTION[self.cp_comm_type] if cp > 1 else CP_ATTENTION["p2p"]
            out = attend(q, k, v, self.cp_group, self.softmax_scale, causal, docs, self.backend, self.comm_stats)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)

    def _packed_attention(self, varlen: Callable[..., Tensor], query: Tensor, key: Tensor, value: Tensor,
                          cu: Tensor, docs: DocBoundaries, causal: bool) -> Tensor:
        """query [s, b, h, d], key/value [s, b, g, d] -> [s, b, h * d] through a varlen kernel.

        The kernels take the b samples concatenated ("thd": [b * s, heads, d]), which is exactly
        what `cu` (cumulative document lengths over the b samples) indexes.
        """
        s, b = query.shape[:2]
        q, k, v = (t.transpose(0, 1).reshape(b * s, t.size(2), t.size(3)) for t in (query, key, value))
        max_len = max(hi - lo for sample in docs for lo, hi in zip(sample, sample[1:]))
        cu32 = cu.to(device=q.device, dtype=torch.int32)
        out = varlen(q, k, v, cu32, max_len, self.softmax_scale, causal)
        return out.view(b, s, self.num_heads * self.head_dim).transpose(0, 1).contiguous()
