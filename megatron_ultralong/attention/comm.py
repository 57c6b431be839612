"""Communication for context-parallel attention, separate from the math, with byte counting.

Every tensor the CP attention code sends goes through this module, so `CommStats` (passed
explicitly; no global counters) sees all of it. Bytes are counted as what THIS rank puts on the
wire in a bandwidth-optimal algorithm:
    ring p2p send of x:          |x|
    all-gather of local x:       (cp - 1) * |x|        (every other rank needs x once)
    reduce-scatter of full y:    (cp - 1) / cp * |y|   (all but this rank's own slice)
    all-to-all of x:             (cp - 1) / cp * |x|   (the slice for itself stays)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

# Distinct tags keep the K/V ring and the dK/dV ring apart: with cp=2 both talk to the same peer,
# and gloo matches messages by (peer, tag); NCCL orders them per communicator, which the fixed
# issue order on every rank also satisfies.
TAG_KV = 11
TAG_DKV = 12

logger = logging.getLogger(__name__)

# The tensor collectives under their two names: torch 2.13 renamed all_gather_into_tensor /
# reduce_scatter_tensor to all_gather_single / reduce_scatter_single (the old names now warn), while
# the torch 2.9-2.11 of NGC containers has only the old ones (present since torch 2.1).
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_gloo_reduce_scatter_ok = True
"""False once gloo refused a tensor reduce-scatter (older torch builds lack it for gloo)."""


@dataclass
class CommStats:
    """Bytes and messages this rank sent, by operation name (e.g. "p2p_kv", "all_gather_kv")."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(nbytes)
        self.messages[name] = self.messages.get(name, 0) + 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.messages.clear()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class RingComm:
    """Send to the next CP rank and receive from the previous one, asynchronously.

    `send_recv` posts both operations with `batch_isend_irecv` and returns the receive buffer at
    once; `wait` blocks until both completed. The caller computes in between (the overlap).
    """

    def __init__(self, group: dist.ProcessGroup, tag: int, name: str, stats: Optional[CommStats]):
        self.group, self.tag, self.name, self.stats = group, tag, name, stats
        rank, size = group.rank(), group.size()
        self.next, self.prev = (rank + 1) % size, (rank - 1) % size
        self._reqs: list = []
        self._send_buf: Optional[Tensor] = None  # kept alive until the send completed

    def send_recv(self, send: Tensor, recv: Optional[Tensor] = None) -> Tensor:
        if self._reqs:
            raise RuntimeError(f"RingComm({self.name}): previous send_recv not waited for")
        send = send.contiguous()
        recv = torch.empty_like(send) if recv is None else recv
        ops = [
            dist.P2POp(dist.isend, send, group=self.group, group_peer=self.next, tag=self.tag),
            dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev, tag=self.tag),
        ]
        self._reqs = dist.batch_isend_irecv(ops)
        self._send_buf = send
        if self.stats is not None:
            self.stats.add(self.name, _nbytes(send))
        return recv

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs, self._send_buf = [], None


def all_gather_dim0(x: Tensor, group: dist.ProcessGroup, name: str, stats: Optional[CommStats]) -> Tensor:
    """[n, ...] on every rank -> [cp, n, ...] in rank order."""
    cp = group.size()
    x = x.contiguous()
    # The backends want the output concatenated along dim 0 ([cp*n, ...]), not stacked.
    out = torch.empty((cp * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_tensor(out, x, group=group)
    if stats is not None:
        stats.add(name, (cp - 1) * _nbytes(x))
    return out.view((cp,) + tuple(x.shape))


def reduce_scatter_dim0(y: Tensor, group: dist.ProcessGroup, name: str, stats: Optional[CommStats]) -> Tensor:
    """[cp, n, ...] -> this rank's [n, ...] summed over ranks."""
    cp = group.size()
    if y.size(0) != cp:
        raise ValueError(f"reduce_scatter input dim 0 is {y.size(0)}, expected cp={cp}")
    y = y.contiguous().flatten(0, 1)  # [cp*n, ...], as the backends expect
    out = torch.empty(y.shape[0] // cp, *y.shape[1:], dtype=y.dtype, device=y.device)
    _reduce_scatter(out, y, group)
    if stats is not None:
        stats.add(name, (cp - 1) * _nbytes(out))
    return out


def _reduce_scatter(out: Tensor, y: Tensor, group: dist.ProcessGroup) -> None:
    """out [n, ...] = this rank's slice of y [cp*n, ...] summed over ranks.

    NCCL always has the tensor reduce-scatter. gloo gained it only in recent torch releases; where
    it is missing, the CPU fallback all-reduces the whole buffer and keeps this rank's slice (cp
    times the traffic, acceptable for CPU tests; CommStats still counts the optimal bytes).
    """
    global _gloo_reduce_scatter_ok
    gloo = dist.get_backend(group) == "gloo"
    if not gloo or _gloo_reduce_scatter_ok:
        try:
            _reduce_scatter_tensor(out, y, group=group)
            return
        except (RuntimeError, NotImplementedError) as exc:
            if not gloo:
                raise
            _gloo_reduce_scatter_ok = False
            logger.info("gloo has no tensor reduce-scatter here (%s); using all_reduce + slice", exc)
    total = y.clone()
    dist.all_reduce(total, group=group)
    n = out.size(0)
    out.copy_(total[group.rank() * n : (group.rank() + 1) * n])


def all_to_all_dim0(x: Tensor, group: dist.ProcessGroup, name: str, stats: Optional[CommStats]) -> Tensor:
    """[cp, ...]: slice i goes to rank i; returns [cp, ...] whose slice j came from rank j."""
    cp = group.size()
    if x.size(0) != cp:
        raise ValueError(f"all_to_all input dim 0 is {x.size(0)}, expected cp={cp}")
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    if stats is not None:
        stats.add(name, (cp - 1) * _nbytes(x) // cp)
    return out


def expected_bytes_per_rank(
    cp_comm_type: str, cp: int, batch: int, heads: int, kv_heads: int, local_len: int, head_dim: int,
    elem_bytes: int,
) -> dict[str, int]:
    """Bytes one rank sends for one attention layer's forward + backward, by operation name.

    The formulas of docs/context_parallel.md, with n = local_len = S/cp, e = elem_bytes and
    KV = 2*b*g*n*d (the local K and V elements). dK/dV are summed across ranks in fp32 (4 bytes).
        p2p:        p2p_kv  2*(cp-1)*KV*e (forward and backward rings),  p2p_dkv (cp-1)*KV*4
        all_gather: all_gather_kv 2*(cp-1)*KV*e (gathered again in backward),
                    reduce_scatter_dkv (cp-1)*KV*4
        a2a:        (cp-1)/cp of: q+k+v and out (forward), dout and dq+dk+dv (backward), all in e
    """
    kv = 2 * batch * kv_heads * local_len * head_dim
    q = batch * heads * local_len * head_dim
    if cp_comm_type == "p2p":
        return {"p2p_kv": 2 * (cp - 1) * kv * elem_bytes, "p2p_dkv": (cp - 1) * kv * 4}
    if cp_comm_type == "all_gather":
        return {"all_gather_kv": 2 * (cp - 1) * kv * elem_bytes, "reduce_scatter_dkv": (cp - 1) * kv * 4}
    if cp_comm_type == "a2a":
        def part(n: int) -> int:
            return (cp - 1) * n * elem_bytes // cp
        return {"a2a_qkv": part(q + kv), "a2a_out": part(q), "a2a_dout": part(q), "a2a_dqkv": part(q + kv)}
    raise ValueError(f"cp_comm_type={cp_comm_type!r}: expected 'p2p', 'all_gather' or 'a2a'")
