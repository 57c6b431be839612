"""All-gather context-parallel attention (Llama-3 style), with explicit backward.

Forward: all-gather this layer's K/V over the CP group (only the g KV heads), put them in natural
order, and attend the rank's two query chunks (r, 2cp-1-r) to their causal prefixes: for chunk j, a
full block over keys [0, j*c) and a causal block on the diagonal, merged in fp32. The collective is
not overlapped (exposed), but with GQA it is small: per rank (cp-1) * 2*b*g*n*d*e bytes.

Backward: K/V are gathered again rather than kept (keeping them would hold a full-sequence K/V per
layer until backward, 4 GiB per layer at 1M tokens for Llama-3.1-8B); dK/dV of the whole sequence
are accumulated in fp32 and reduce-scattered back to their owners: (cp-1) * 2*b*g*n*d*4 bytes.

Memory: the gathered K/V (and, transiently, its natural-order copy) is 2*b*g*S*d*e per rank.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.attention.comm import CommStats, all_gather_dim0, reduce_scatter_dim0
from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into
from megatron_ultralong.attention.segments import DocBoundaries, Segment, build_segments
from megatron_ultralong.attention.softmax_merge import empty_accumulator, final_output
from megatron_ultralong.parallel.cp_layout import chunk_len, local_ranges, stack_shards, unshard_tensors


def _gather_kv(group: dist.ProcessGroup, k: Tensor, v: Tensor, stats: Optional[CommStats]) -> Tensor:
    """Local k/v [b, g, n, d] -> global K/V in natural order [2, b, g, S, d]."""
    gathered = all_gather_dim0(torch.stack([k, v]), group, "all_gather_kv", stats)  # [cp, 2, b, g, n, d]
    return unshard_tensors(list(gathered.unbind(0)), seq_dim=3)


def _segments(group: dist.ProcessGroup, n_local: int, causal: bool, docs: Optional[DocBoundaries]) -> list[Segment]:
    cp, rank = group.size(), group.rank()
    seq_len = n_local * cp
    c = chunk_len(seq_len, cp)
    # Keys as the 2cp natural-order chunks; full chunk pairs coalesce into one prefix block.
    k_ranges = [(j * c, (j + 1) * c) for j in range(2 * cp)]
    return build_segments(local_ranges(seq_len, cp, rank), k_ranges, causal, docs)


def all_gather_forward(
    group: dist.ProcessGroup, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
    docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats],
) -> tuple[Tensor, Tensor]:
    """q [b, h, n, d], k/v [b, g, n, d] -> out [b, h, n, d] (q dtype), lse fp32 [b, h, n]."""
    kv = _gather_kv(group, k, v, stats)
    out, lse = empty_accumulator(q)
    attention_forward_into(out, lse, q, kv[0], kv[1], _segments(group, q.size(2), causal, docs), scale, backend)
    return final_output(out, q.dtype), lse


def all_gather_backward(
    group: dist.ProcessGroup, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    scale: float, causal: bool, docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats],
) -> tuple[Tensor, Tensor, Tensor]:
    """dq [b, h, n, d], dk/dv [b, g, n, d]."""
    cp = group.size()
    kv = _gather_kv(group, k, v, stats)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # [2, b, g, S, d]
    segments = _segments(group, q.size(2), causal, docs)
    attention_backward_into(dq, dkv[0], dkv[1], dout.to(q.dtype), q, kv[0], kv[1], out, lse, segments, scale, backend)
    del kv
    # Slice r of the send buffer holds rank r's two chunks; the sum over ranks lands on its owner.
    own = reduce_scatter_dim0(stack_shards(dkv, cp, seq_dim=3), group, "reduce_scatter_dkv", stats)
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


class AllGatherAttnFunc(torch.autograd.Function):
    """Autograd wrapper; the backward is explicit (no autograd through communication)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, scale: float,
                causal: bool, docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats]) -> Tensor:
        out, lse = all_gather_forward(group, q, k, v, scale, causal, docs, backend, stats)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, scale, causal, docs, backend, stats)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, causal, docs, backend, stats = ctx.args
        dq, dk, dv = all_gather_backward(group, dout, q, k, v, out, lse, scale, causal, docs, backend, stats)
        return dq, dk, dv, None, None, None, None, None, None


def all_gather_attention(
    q: Tensor, k: Tensor, v: Tensor, cp_group: dist.ProcessGroup, softmax_scale: float,
    causal: bool = True, docs: Optional[DocBoundaries] = None, backend: str = "auto",
    stats: Optional[CommStats] = None,
) -> Tensor:
    """All-gather K/V attention. q [b, h, S/cp, d], k/v [b, g, S/cp, d] (zigzag-local) -> [b, h, S/cp, d]."""
    return AllGatherAttnFunc.apply(q, k, v, cp_group, softmax_scale, causal, docs, backend, stats)
