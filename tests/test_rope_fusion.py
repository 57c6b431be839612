"""RoPE fusion: megatron's Transformer Engine path is chosen where it applies, and computes what the
unfused path computes.

TE's `apply_rotary_pos_emb(t, freqs, tensor_format="sbhd", fused=True)` is absent on CPU; a
stand-in with its documented contract takes its place in megatron-core (`rope_utils.
fused_apply_rotary_pos_emb`): freqs fp32 [s, 1, 1, d] (one row of angles: hence micro-batch 1),
output t * cos(freqs) + rotate_half(t) * sin(freqs) (TransformerEngine
transformer_engine/pytorch/attention/rope.py, non-interleaved), no mscale. The plugin folds the YaRN
attention factor into the softmax scale instead, so both paths must give HF's logits, whose cos
and sin carry the factor (transformers' `_compute_yarn_parameters` attention_factor).
"""
from __future__ import annotations

import math

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ultralong.model import PRESETS
from megatron_ultralong.model.gpt import to_transformer_config
from megatron_ultralong.parallel import runtime
from megatron_ultralong.parallel.runtime import ParallelConfig, Runtime
from megatron_ultralong.rope.config import yarn_for_context_length
from megatron_ultralong.rope.embedding import RotaryAngles

CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _TeFusedRope:
    """Stand-in for megatron's TE wrapper: TE's documented sbhd contract, and a call counter."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t, freqs, transpose_output_memory=False, interleaved=False):
        assert freqs.dtype == torch.float32 and freqs.dim() == 4 and freqs.shape[1:3] == (1, 1), freqs.shape
        assert not interleaved
        self.calls += 1
        return (t.float() * freqs.cos() + _rotate_half(t.float()) * freqs.sin()).to(t.dtype)


@pytest.fixture
def te_rope(monkeypatch):
    stub = _TeFusedRope()
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", stub)
    return stub


def test_fusion_is_chosen_where_te_provides_it(te_rope, monkeypatch):
    assert runtime.rope_fusion_choice(CUDA, 1)
    assert not runtime.rope_fusion_choice(CUDA, 2)  # TE's kernel takes one row of angles
    assert not runtime.rope_fusion_choice(CUDA, None)  # unknown batch (evaluation)
    assert not runtime.rope_fusion_choice(torch.device("cpu"), 1)
    assert runtime.megatron_config_overrides(CUDA, 1)["apply_rope_fusion"]
    # The model's TransformerConfig at micro-batch 1 on a GPU runtime (megatron validates the flag
    # against the same TE import), with the YaRN factor in the softmax scale.
    model = PRESETS["tiny"]
    model = type(model)(**{**model.__dict__, "rope": yarn_for_context_length(1 << 20)})
    rt = Runtime(device=CUDA, rank=0, world_size=1, parallel=ParallelConfig(), data_parallel_size=1,
                 pg_collection=None)
    cfg = to_transformer_config(model, rt, micro_batch_size=1)
    factor = RotaryAngles(model.rope, model.head_dim).attention_factor
    assert cfg.apply_rope_fusion and factor > 1
    assert cfg.softmax_scale == pytest.approx(factor ** 2 / math.sqrt(model.head_dim))
    assert not to_transformer_config(model, rt, micro_batch_size=4).apply_rope_fusion
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    assert not runtime.rope_fusion_choice(CUDA, 1)


def test_fused_and_unfused_rope_give_hf_logits(te_rope):
    d, heads, s = 128, 2, 64
    rope = yarn_for_context_length(1 << 20)
    angles_mod = RotaryAngles(rope, d)
    factor = angles_mod.attention_factor
    scale = factor ** 2 / math.sqrt(d)  # what to_transformer_config passes as softmax_scale
    gen = torch.Generator().manual_seed(0)
    # Positions of a zigzag shard deep into a 1M sequence: two runs of 32 tokens.
    pos = torch.cat([torch.arange(5000, 5032), torch.arange(1_040_000, 1_040_032)])[None]
    angles = angles_mod(pos)  # [s, 1, 1, d]: one row, as TE's kernel needs
    assert angles.shape == (s, 1, 1, d)
    q, k = (torch.randn(s, 1, heads, d, generator=gen, dtype=torch.float64).float() for _ in range(2))
    logits = {}
    for fused in (True, False):
        config = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads,
                                   apply_rope_fusion=fused)
        calls = te_rope.calls
        qr, kr = (rope_utils.apply_rotary_pos_emb(t, angles, config, cp_group=object()) for t in (q, k))
        assert te_rope.calls == calls + (2 if fused else 0)  # fused: megatron routed to TE, no fallback
        logits[fused] = torch.einsum("sbhd,tbhd->bhst", qr, kr) * scale
    # HF: fp32 angles position * inv_freq; cos and sin carry the attention factor; logits scaled by
    # 1/sqrt(d). The rest in float64.
    freqs = (pos[0].float()[:, None] * angles_mod.inv_freq).double()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    cos, sin = emb.cos() * factor, emb.sin() * factor
    qh, kh = (t.double() * cos + _rotate_half(t.double()) * sin for t in (q, k))
    ref = torch.einsum("sbhd,tbhd->bhst", qh, kh) / math.sqrt(d)
    for fused, got in logits.items():
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=f"fused={fused}")
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
