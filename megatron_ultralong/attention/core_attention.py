"""The plugin's module for the `core_attention` slot of Megatron-Core's `SelfAttention`.

Megatron-Core's own `DotProductAttention` asserts context_parallel_size == 1 and materialises the
full [b, np, sq, sk] score matrix; its CP path exists only inside Transformer Engine. This module
keeps Megatron-Core's constructor and forward signatures, so it drops into a layer spec in place of
either, and computes attention with a kernel that never materialises the scores.

RoPE (including the YaRN attention factor, folded into `softmax_scale` by the model builder) is
applied by `SelfAttention` before this module is called; q/k/v arrive already rotated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor


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
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout}: UltraLongCoreAttention supports only 0 "
                "(Llama trains without attention dropout)"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"attn_mask_type={attn_mask_type}: only causal or no_mask is supported")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
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
        self.cp_comm_type = cp_comm_type

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

        Returns the context [sq, b, np * hn]. `attention_mask` is ignored: causality comes from
        `attn_mask_type`, never from a dense [s, s] mask (impossible at 1M tokens).
        """
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by UltraLongCoreAttention")
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (document masking) needs context-parallel attention")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]; SDPA repeats the KV heads internally (enable_gqa).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
