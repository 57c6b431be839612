"""Rotary angles from explicit global position ids, in the layout Megatron-Core's attention applies.

Megatron-Core's `GPTModel` builds its rotary table from the sequence *length* and ignores
`position_ids` (Megatron-LM #453), then slices it for context parallelism by assuming the zigzag
layout. Here the angles come from the position ids themselves, so whatever produced the tokens on a
rank (a zigzag CP shard, packed documents with restarted positions, a decode step at offset N)
produces matching angles with no second copy of the layout logic.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_ultralong.rope.config import RopeConfig
from megatron_ultralong.rope.frequencies import compute_rope_parameters


class RotaryAngles(nn.Module):
    """position_ids [b, s] -> angles [s, b, 1, d] (fp32), the `rotary_pos_emb` Megatron expects.

    The angles are [freqs, freqs] (non-interleaved, rotate-half layout, as HF Llama and
    Megatron-Core with rotary_interleaved=False), freqs = position * inv_freq in fp32 exactly as HF
    forms them (a K=1 matmul there, one fp32 product either way). Megatron's attention takes cos/sin
    of these; the YaRN attention factor is *not* applied here (see `attention_factor`).
    """

    inv_freq: Tensor

    def __init__(self, rope: RopeConfig, rotary_dim: int):
        super().__init__()
        self.rope = rope
        inv_freq, self.attention_factor = compute_rope_parameters(rope, rotary_dim, torch.device("cpu"))
        # Not persistent: derived from the config, never part of a checkpoint (HF drops it too).
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
        inv_freq = self.inv_freq.to(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            # All rows equal (the common case, b = 1 at 1M tokens): compute one row, broadcast.
            if position_ids.shape[0] > 1 and bool((position_ids == position_ids[:1]).all()):
                position_ids = position_ids[:1]
            freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, d]
