"""All-to-all (DeepSpeed-Ulysses) context-parallel attention, with explicit backward.

An all-to-all turns the sequence-sharded q, k, v [b, H, S/cp, d] into head-sharded ones
[b, H/cp, S, d]: rank i receives head group i of every rank's tokens, puts them in natural order,
and runs ordinary attention over the whole sequence (one causal kernel call, or one per document).
A second all-to-all sends the output back to the sequence layout. Backward mirrors it: dO goes to the
head layout, dQ, dK, dV come back.

Heads: q heads (per TP rank) AND KV heads must divide by cp, else ValueError. KV heads are not
replicated to make them divide: only the g real KV heads travel (for Llama-3.1-8B, 8 KV heads cap
a2a at cp <= 8 / TP; use "p2p" or "all_gather" beyond that). With GQA, rank i's q heads
[i*h/cp, (i+1)*h/cp) use exactly KV heads [i*g/cp, (i+1)*g/cp), so the grouping is preserved.

Communication per rank per layer: (cp-1)/cp * (|q| + |k| + |v| + |out|) forward and the same for
(|dout| + |dq| + |dk| + |dv|) backward, all in the input dtype; q, k and v share one all-to-all.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.attention.comm import CommStats, all_to_all_dim0
from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into
from megatron_ultralong.attention.segments import DocBoundaries, build_segments
from megatron_ultralong.attention.softmax_merge import empty_accumulator
from megatron_ultralong.parallel.cp_layout import stack_shards, unshard_tensors


def check_a2a_heads(num_heads: int, num_kv_heads: int, cp_size: int) -> None:
    """ValueError unless both head counts (per TP rank) divide by the CP size."""
    if num_heads % cp_size or num_kv_heads % cp_size:
        raise ValueError(
            f"cp_comm_type='a2a' needs attention heads ({num_heads}) and KV heads ({num_kv_heads}) per "
            f"TP rank divisible by context_parallel_size={cp_size}; use cp_comm_type='p2p' or 'all_gather'"
        )


def _seq_to_heads(xs: list[Tensor], group: dist.ProcessGroup, name: str, stats: Optional[CommStats]) -> list[Tensor]:
    """Each [.., H, n, d] (zigzag-local) -> [.., H/cp, S, d] (natural order), in one all-to-all."""
    cp = group.size()
    sends = [x.unflatten(-3, (cp, x.size(-3) // cp)).movedim(-4, 0) for x in xs]  # [cp, .., H/cp, n, d]
    recv = all_to_all_dim0(torch.cat([s.reshape(cp, -1) for s in sends], dim=1), group, name, stats)
    outs, offset = [], 0
    for s in sends:
        size = s[0].numel()
        part = recv[:, offset : offset + size].view(s.shape)  # slice j: rank j's tokens, our heads
        outs.append(unshard_tensors(list(part.unbind(0)), seq_dim=-2))
        offset += size
    return outs


def _heads_to_seq(ys: list[Tensor], group: dist.ProcessGroup, name: str, stats: Optional[CommStats]) -> list[Tensor]:
    """Inverse of `_seq_to_heads`: each [.., H/cp, S, d] -> [.., H, n, d], in one all-to-all."""
    cp = group.size()
    sends = [stack_shards(y, cp, seq_dim=-2) for y in ys]  # slice r: rank r's tokens
    recv = all_to_all_dim0(torch.cat([s.reshape(cp, -1) for s in sends], dim=1), group, name, stats)
    outs, offset = [], 0
    for s in sends:
        size = s[0].numel()
        part = recv[:, offset : offset + size].view(s.shape)  # slice j: head group j, our tokens
        outs.append(part.movedim(0, -4).flatten(-4, -3))
        offset += size
    return outs


class UlyssesAttnFunc(torch.autograd.Function):
    """Autograd wrapper; the backward is explicit (no autograd through communication)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, scale: float,
                causal: bool, docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats]) -> Tensor:
        cp = group.size()
        check_a2a_heads(q.size(1), k.size(1), cp)
        qh, kvh = _seq_to_heads([q, torch.stack([k, v])], group, "a2a_qkv", stats)
        seq_len = q.size(2) * cp
        segments = build_segments([(0, seq_len)], [(0, seq_len)], causal, docs)
        out_h, lse_h = empty_accumulator(qh)
        attention_forward_into(out_h, lse_h, qh, kvh[0], kvh[1], segments, scale, backend)
        out_h = out_h.to(q.dtype)
        (out,) = _heads_to_seq([out_h], group, "a2a_out", stats)
        # Head-sharded tensors are saved: the same memory as the local q, k, v, out, and backward
        # then needs no all-to-all of q, k, v, out.
        ctx.save_for_backward(qh, kvh, out_h, lse_h)
        ctx.args = (group, scale, segments, backend, stats)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        qh, kvh, out_h, lse_h = ctx.saved_tensors
        group, scale, segments, backend, stats = ctx.args
        (dout_h,) = _seq_to_heads([dout.to(qh.dtype)], group, "a2a_dout", stats)
        dq_h = torch.zeros(qh.shape, dtype=torch.float32, device=qh.device)
        dkv_h = torch.zeros(kvh.shape, dtype=torch.float32, device=kvh.device)
        attention_backward_into(dq_h, dkv_h[0], dkv_h[1], dout_h, qh, kvh[0], kvh[1], out_h, lse_h, segments, scale, backend)
        dq, dkv = _heads_to_seq([dq_h.to(qh.dtype), dkv_h.to(kvh.dtype)], group, "a2a_dqkv", stats)
        return dq, dkv[0], dkv[1], None, None, None, None, None, None


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, cp_group: dist.ProcessGroup, softmax_scale: float,
    causal: bool = True, docs: Optional[DocBoundaries] = None, backend: str = "auto",
    stats: Optional[CommStats] = None,
) -> Tensor:
    """Ulysses attention. q [b, h, S/cp, d], k/v [b, g, S/cp, d] (zigzag-local) -> [b, h, S/cp, d]."""
    return UlyssesAttnFunc.apply(q, k, v, cp_group, softmax_scale, causal, docs, backend, stats)
