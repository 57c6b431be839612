"""Ring (p2p) context-parallel attention on the zigzag layout, with explicit backward.

Each CP rank holds q, k, v for its two chunks (r, 2cp-1-r) of the sequence (parallel/cp_layout.py). In
cp steps every rank sees every rank's K/V block: at step i it holds the block of rank
src = (r - i) mod cp, and while it computes on it, that block is already travelling on to rank r+1
(isend/irecv posted before the compute: communication overlapped with compute).

Which chunk pairs are visible under the causal mask (zigzag ring, ring-flash-attention
`zigzag_ring_flash_attn.py`) follows from the global positions alone; `segments.build_segments`
derives it, and fully masked pairs are never computed:
    step 0 (own block):  q chunk r   x k chunk r        causal
                         q chunk 2cp-1-r x k chunk r    full
                         q chunk 2cp-1-r x k chunk 2cp-1-r  causal
    src < r:  both q chunks x k chunk src               full (k chunk 2cp-1-src is in the future)
    src > r:  q chunk 2cp-1-r x both k chunks           full (q chunk r sees neither)
Every step costs one c x 2c block, so all ranks do equal work. Partial results merge in fp32
(softmax_merge.py).

Backward: K/V go around the ring again; the dK/dV of a block travel with it (fp32, so the sum over
cp ranks does not round in bf16): rank r+1 starts the buffer for rank r's block, every rank adds
its share and passes it on, and after cp-1 hops it arrives home, where the owner adds its own
step-0 share. dQ stays local. Sends of step i overlap the compute of step i+1.

Communication per rank per layer (b batch, g KV heads, n = S/cp local tokens, d head dim,
e bytes per element): forward (cp-1) * 2*b*g*n*d*e; backward the same for K/V plus
(cp-1) * 2*b*g*n*d*4 for dK/dV. Only the g KV heads travel, never the repeated h.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.attention.comm import TAG_DKV, TAG_KV, CommStats, RingComm
from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into
from megatron_ultralong.attention.segments import DocBoundaries, build_segments
from megatron_ultralong.attention.softmax_merge import empty_accumulator, final_output
from megatron_ultralong.parallel.cp_layout import local_ranges


def ring_forward(
    group: dist.ProcessGroup, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool,
    docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats],
) -> tuple[Tensor, Tensor]:
    """q [b, h, n, d], k/v [b, g, n, d] (zigzag-local) -> out [b, h, n, d] (q dtype), lse fp32 [b, h, n]."""
    cp, rank = group.size(), group.rank()
    seq_len = q.size(2) * cp
    q_ranges = local_ranges(seq_len, cp, rank)
    kv = torch.stack([k, v])  # [2, b, g, n, d]: one message per step
    out, lse = empty_accumulator(q)
    comm = RingComm(group, TAG_KV, "p2p_kv", stats)
    for step in range(cp):
        if step + 1 < cp:
            next_kv = comm.send_recv(kv)  # in flight while this step computes
        src = (rank - step) % cp
        segments = build_segments(q_ranges, local_ranges(seq_len, cp, src), causal, docs)
        attention_forward_into(out, lse, q, kv[0], kv[1], segments, scale, backend)
        if step + 1 < cp:
            comm.wait()
            kv = next_kv
    return final_output(out, q.dtype), lse


def ring_backward(
    group: dist.ProcessGroup, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    scale: float, causal: bool, docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq [b, h, n, d], dk/dv [b, g, n, d]) from the saved forward out and lse."""
    cp, rank = group.size(), group.rank()
    seq_len = q.size(2) * cp
    q_ranges = local_ranges(seq_len, cp, rank)
    dout = dout.to(q.dtype)
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv_comm = RingComm(group, TAG_KV, "p2p_kv", stats)
    dkv_comm = RingComm(group, TAG_DKV, "p2p_dkv", stats)
    own_dkv: Optional[Tensor] = None
    incoming: Optional[Tensor] = None
    for step in range(cp):
        if step + 1 < cp:
            next_kv = kv_comm.send_recv(kv)
        src = (rank - step) % cp
        segments = build_segments(q_ranges, local_ranges(seq_len, cp, src), causal, docs)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        attention_backward_into(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out, lse, segments, scale, backend)
        if step == 0:
            own_dkv = dkv  # our share of our own block; the other ranks' shares come home last
        else:
            if step >= 2:
                dkv_comm.wait()  # the buffer for block src, sent by rank r-1 at its step-1
                dkv += incoming
            incoming = dkv_comm.send_recv(dkv)
        if step + 1 < cp:
            kv_comm.wait()
            kv = next_kv
    if cp > 1:
        dkv_comm.wait()  # sent by rank r-1 at step cp-1: every other rank's share of our block
        own_dkv += incoming
    return dq.to(q.dtype), own_dkv[0].to(k.dtype), own_dkv[1].to(v.dtype)


class RingAttnFunc(torch.autograd.Function):
    """Autograd wrapper; the backward is explicit (no autograd through communication)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, scale: float,
                causal: bool, docs: Optional[DocBoundaries], backend: str, stats: Optional[CommStats]) -> Tensor:
        out, lse = ring_forward(group, q, k, v, scale, causal, docs, backend, stats)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, scale, causal, docs, backend, stats)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, causal, docs, backend, stats = ctx.args
        dq, dk, dv = ring_backward(group, dout, q, k, v, out, lse, scale, causal, docs, backend, stats)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, cp_group: dist.ProcessGroup, softmax_scale: float,
    causal: bool = True, docs: Optional[DocBoundaries] = None, backend: str = "auto",
    stats: Optional[CommStats] = None,
) -> Tensor:
    """Zigzag ring attention. q [b, h, S/cp, d], k/v [b, g, S/cp, d] -> [b, h, S/cp, d].

    Inputs hold this rank's zigzag chunks (parallel/cp_layout.py); `docs` optionally masks attention to
    documents (segments.DocBoundaries, global positions).
    """
    return RingAttnFunc.apply(q, k, v, cp_group, softmax_scale, causal, docs, backend, stats)
