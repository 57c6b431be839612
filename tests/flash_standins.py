"""Stand-ins for the flash-attn packages with the real call conventions, computing with PyTorch's
CPU attention ops so that a correct binding reproduces F.scaled_dot_product_attention.

Signatures copied from Dao-AILab/flash-attention at the named tags:
- flash-attn 2 (flash_attn/flash_attn_interface.py): >= 2.7 registers `_flash_attn_backward` as a
  torch.library.custom_op (window left/right ints), 2.6 is a plain function taking a window tuple;
  `flash_attn_varlen_func` is the same from 2.6.3 to 2.8.3.
- FlashAttention-3 (hopper/flash_attn_interface.py): `flash_attn_func` at v2.7.4.post1, v2.8.0
  (both return (out, softmax_lse)), v2.8.3 (returns only out: commit ed209409) and 203b9b3d (adds
  `return_attn_probs`); `_flash_attn_forward` (plain functions, keyword-callable) and the
  positional `_flash_attn_backward`; `flash_attn_varlen_func` at v2.7.4.post1 (seqused_q/k
  required positionals), v2.8.3 and 203b9b3d.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

_cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bhsd(*ts):
    return [t.transpose(1, 2) for t in ts]


def attn_bshd(q, k, v, scale, causal):
    """(out [b, s, h, d], lse [b, h, s]) of [b, s, h, d] inputs; GQA native."""
    qh, kh, vh = (t.contiguous() for t in _bhsd(q, k, v))
    out, lse = _cpu_fwd(qh, kh, vh, 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def backward_math(dout, q, k, v, out, lse, dq, dk, dv, scale, causal):
    g = _cpu_bwd(*[t.contiguous() for t in _bhsd(dout, q, k, v, out)], lse, 0.0, causal, scale=scale)
    for dst, src in zip((dq, dk, dv), g):
        dst.copy_(src.transpose(1, 2))


class VarlenCalls:
    """Counts calls of the varlen stand-ins (the test asserts one per layer)."""

    count = 0


def varlen_math(q, k, v, cu, scale, causal):
    """Differentiable reference of a varlen kernel: q [t, h, d], k/v [t, g, d], per document."""
    VarlenCalls.count += 1
    outs = []
    bounds = [int(x) for x in cu.tolist()]
    for a, b in zip(bounds, bounds[1:]):
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale,
                                                   enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(outs)


# --- flash-attn 2 ----------------------------------------------------------------------------------

def public_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func of 2.x: [b, s, h, d]; with return_attn_probs -> (out, lse [b, h, s], S_dmask)."""
    out, lse = attn_bshd(q, k, v, softmax_scale, causal)
    return (out, lse, torch.empty(0)) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0 and cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    return varlen_math(q, k, v, cu_seqlens_q, softmax_scale, causal)


def standin_fa27() -> types.SimpleNamespace:
    name = f"standin_fa27_{id(object())}"

    @torch.library.custom_op(f"{name}::_flash_attn_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
    def _flash_attn_backward(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
        dv: Optional[torch.Tensor], dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
        deterministic: bool, rng_state: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        assert (window_size_left, window_size_right, dropout_p) == (-1, -1, 0.0)
        backward_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
        return torch.empty(0)

    return types.SimpleNamespace(flash_attn_func=public_flash_attn_func, _flash_attn_backward=_flash_attn_backward,
                                 flash_attn_varlen_func=flash_attn_varlen_func)


def standin_fa26() -> types.SimpleNamespace:
    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size, softcap, alibi_slopes, deterministic, rng_state=None):
        assert window_size == (-1, -1) and softcap == 0.0 and alibi_slopes is None
        backward_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
        return dq, dk, dv, torch.empty(0)

    return types.SimpleNamespace(flash_attn_func=public_flash_attn_func, _flash_attn_backward=_flash_attn_backward,
                                 flash_attn_varlen_func=flash_attn_varlen_func)


# --- FlashAttention-3 (hopper) ---------------------------------------------------------------------

def _fa3_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k, max_seqlen_q,
                  max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1), softcap=0.0,
                  deterministic=False, sm_margin=0):
    assert cu_seqlens_q is None and max_seqlen_q is None
    backward_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return torch.empty(0)


def _fa3_forward_v274(q, k, v, k_new, v_new, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
                      seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos,
                      rotary_sin, q_descale, k_descale, v_descale, softmax_scale, causal, window_size=(-1, -1),
                      sink_token_length=0, softcap=0.0, rotary_interleaved=True, num_splits=1, pack_gqa=None,
                      sm_margin=0):
    assert all(t is None for t in (k_new, v_new, out, cu_seqlens_q, page_table, rotary_cos, q_descale))
    o, lse = attn_bshd(q, k, v, softmax_scale, causal)
    return o, lse, torch.empty(0), torch.empty(0)


def _fa3_forward_v28(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
                     seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos,
                     rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale, softmax_scale, causal,
                     window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                     scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):
    assert all(t is None for t in (k_new, qv, out, cu_seqlens_q, seqlens_rotary, q_descale))
    o, lse = attn_bshd(q, k, v, softmax_scale, causal)
    return o, lse, torch.empty(0), torch.empty(0)


def _fa3_func_v274(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None,
                   window_size=(-1, -1), sink_token_length=0, softcap=0.0, num_splits=1, pack_gqa=None,
                   deterministic=False, sm_margin=0):
    return attn_bshd(q, k, v, softmax_scale, causal)


def _fa3_func_v280(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                   v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                   pack_gqa=None, deterministic=False, sm_margin=0):
    return attn_bshd(q, k, v, softmax_scale, causal)


def _fa3_func_v283(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                   v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                   pack_gqa=None, deterministic=False, sm_margin=0):
    return attn_bshd(q, k, v, softmax_scale, causal)[0]  # ed209409: "Don't return lse"


def _fa3_func_203b(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                   v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                   pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    out, lse = attn_bshd(q, k, v, softmax_scale, causal)
    return (out, lse) if return_attn_probs else out


def _fa3_varlen_v274(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None,
                     window_size=(-1, -1), sink_token_length=0, softcap=0.0, num_splits=1, pack_gqa=None,
                     deterministic=False, sm_margin=0):
    assert seqused_q is None and seqused_k is None and cu_seqlens_q.dtype == torch.int32
    out = varlen_math(q, k, v, cu_seqlens_q, softmax_scale, causal)
    return out, torch.empty(0)


def _fa3_varlen_v283(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                     seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                     v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                     pack_gqa=None, deterministic=False, sm_margin=0):
    assert cu_seqlens_q.dtype == torch.int32
    return varlen_math(q, k, v, cu_seqlens_q, softmax_scale, causal)


def _fa3_varlen_203b(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                     seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                     v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                     pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    out = varlen_math(q, k, v, cu_seqlens_q, softmax_scale, causal)
    return (out, torch.empty(0)) if return_attn_probs else out


FA3_TAGS = ("v2.7.4.post1", "v2.8.0", "v2.8.3", "203b9b3d")
_FA3 = {
    "v2.7.4.post1": (_fa3_func_v274, _fa3_forward_v274, _fa3_varlen_v274),
    "v2.8.0": (_fa3_func_v280, _fa3_forward_v28, _fa3_varlen_v283),
    "v2.8.3": (_fa3_func_v283, _fa3_forward_v28, _fa3_varlen_v283),
    "203b9b3d": (_fa3_func_203b, _fa3_forward_v28, _fa3_varlen_203b),
}


def standin_fa3(tag: str) -> types.SimpleNamespace:
    """hopper/flash_attn_interface.py as of `tag` (FA3_TAGS)."""
    func, private_forward, varlen = _FA3[tag]
    return types.SimpleNamespace(flash_attn_func=func, _flash_attn_forward=private_forward,
                                 _flash_attn_backward=_fa3_backward, flash_attn_varlen_func=varlen)
