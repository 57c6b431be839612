"""The context-parallel sequence layout: the ONE place that knows which tokens a CP rank holds.

Load-balanced ("zigzag", TE's "DualChunkSwap") layout, as in Megatron-Core's
`get_batch_on_this_cp_rank` (megatron/core/utils.py): the global sequence of length S is cut into
2*cp equal chunks of c = S / (2*cp) tokens, and CP rank r holds chunks r and 2*cp-1-r, in that order,
so its local sequence has S/cp tokens. Under causal attention chunk j costs ~j, so pairing an early
chunk with a late one gives every rank the same work.

Example, cp=2, S=8 (c=2): global chunks [0 1 | 2 3 | 4 5 | 6 7]
    rank 0 holds chunks (0, 3) -> positions [0 1 6 7]
    rank 1 holds chunks (1, 2) -> positions [2 3 4 5]

"Rank-major order" is the concatenation of every rank's local sequence, rank 0 first: what an
all-gather or an all-to-all over the CP group produces. `zigzag_to_natural` /
`natural_to_zigzag` convert between it and the natural (global) order.

Tokens, labels, loss mask and position ids all go through `shard_batch`, and the attention code
and the tests use the same index helpers, so data, RoPE positions and attention cannot disagree.
This module owns the layout instead of calling Megatron's `get_batch_on_this_cp_rank`, whose
signature changed in megatron-core 0.18.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Batch entries that describe the whole (unsharded) sequence and are replicated on every CP rank.
REPLICATED_KEYS: tuple[str, ...] = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def chunk_len(seq_len: int, cp_size: int) -> int:
    """Length c of one of the 2*cp chunks; ValueError when seq_len is not divisible by 2*cp."""
    if cp_size < 1:
        raise ValueError(f"cp_size={cp_size}: expected >= 1")
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"seq_len={seq_len} is not divisible by 2*cp_size={2 * cp_size} (cp_size={cp_size}): "
            "the load-balanced CP layout cuts the sequence into 2*cp equal chunks"
        )
    return seq_len // (2 * cp_size)


def zigzag_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunk ids held by `cp_rank`: (r, 2*cp-1-r)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, cp_size={cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_ranges(seq_len: int, cp_size: int, cp_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Global [start, end) of the two chunks held by `cp_rank`, in local order."""
    c = chunk_len(seq_len, cp_size)
    first, second = zigzag_chunk_ids(cp_size, cp_rank)
    return (first * c, (first + 1) * c), (second * c, (second + 1) * c)


def local_positions(
    seq_len: int, cp_size: int, cp_rank: int, device: Optional[torch.device] = None
) -> Tensor:
    """Global positions of the rank's local tokens: LongTensor [seq_len/cp]."""
    (a0, a1), (b0, b1) = local_ranges(seq_len, cp_size, cp_rank)
    return torch.cat([torch.arange(a0, a1, device=device), torch.arange(b0, b1, device=device)])


def _rank_major_chunk_order(cp_size: int) -> list[int]:
    """Global chunk ids in rank-major order: [0, 2cp-1, 1, 2cp-2, ...]."""
    order: list[int] = []
    for r in range(cp_size):
        order.extend(zigzag_chunk_ids(cp_size, r))
    return order


def shard_tensor(t: Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> Tensor:
    """This rank's part of a global tensor: [.., S, ..] -> [.., S/cp, ..] along `seq_dim`."""
    if cp_size == 1:
        return t
    c = chunk_len(t.size(seq_dim), cp_size)
    first, second = zigzag_chunk_ids(cp_size, cp_rank)
    return torch.cat([t.narrow(seq_dim, first * c, c), t.narrow(seq_dim, second * c, c)], dim=seq_dim)


def shard_batch(
    batch: Mapping[str, Any],
    cp_size: int,
    cp_rank: int,
    seq_dim: int = 1,
    replicated_keys: Sequence[str] = REPLICATED_KEYS,
) -> dict[str, Any]:
    """Shard every per-token tensor of a batch (tokens, labels, loss_mask, position_ids, ...).

    Tensors are [b, S] (or have the sequence at `seq_dim`) and become [b, S/cp]. Entries named in
    `replicated_keys` (global document boundaries) and non-tensors pass through unchanged. All
    sharded tensors must share one sequence length, so a tensor that is not per-token cannot be
    sliced by accident.
    """
    out: dict[str, Any] = {}
    seq_len: Optional[int] = None
    for key, value in batch.items():
        if key in replicated_keys or not isinstance(value, Tensor):
            out[key] = value
            continue
        if value.dim() <= seq_dim:
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(value.shape)}: no sequence dim {seq_dim}; "
                f"list it in replicated_keys if it is not per-token"
            )
        if seq_len is None:
            seq_len = value.size(seq_dim)
        elif value.size(seq_dim) != seq_len:
            raise ValueError(
                f"batch[{key!r}] has sequence length {value.size(seq_dim)} at dim {seq_dim}, "
                f"other entries have {seq_len}"
            )
        out[key] = shard_tensor(value, cp_size, cp_rank, seq_dim)
    return out


def zigzag_to_natural(x: Tensor, cp_size: int, seq_dim: int) -> Tensor:
    """Rank-major order (all ranks' local sequences concatenated) -> natural order, along seq_dim."""
    if cp_size == 1:
        return x
    c = chunk_len(x.size(seq_dim), cp_size)
    order = _rank_major_chunk_order(cp_size)
    where = {chunk: i for i, chunk in enumerate(order)}  # global chunk -> slot in rank-major order
    return torch.cat([x.narrow(seq_dim, where[j] * c, c) for j in range(2 * cp_size)], dim=seq_dim)


def natural_to_zigzag(x: Tensor, cp_size: int, seq_dim: int) -> Tensor:
    """Natural order -> rank-major order (rank r's local sequence is the r-th slice of S/cp)."""
    if cp_size == 1:
        return x
    c = chunk_len(x.size(seq_dim), cp_size)
    return torch.cat([x.narrow(seq_dim, j * c, c) for j in _rank_major_chunk_order(cp_size)], dim=seq_dim)


def unshard_tensors(shards: Sequence[Tensor], seq_dim: int = 1) -> Tensor:
    """Inverse of `shard_tensor`: every rank's local tensor, rank order -> the global tensor.

    One copy: the 2*cp chunks are read as views of the shards, in natural order.
    """
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    c = shards[0].size(seq_dim) // 2
    pieces = []
    for j in range(2 * cp_size):
        rank, half = (j, 0) if j < cp_size else (2 * cp_size - 1 - j, 1)
        pieces.append(shards[rank].narrow(seq_dim, half * c, c))
    return torch.cat(pieces, dim=seq_dim)


def stack_shards(t: Tensor, cp_size: int, seq_dim: int = 1) -> Tensor:
    """Every rank's shard of a global tensor, stacked: [.., S, ..] -> [cp, .., S/cp, ..] (one copy).

    The send buffer of a reduce-scatter or all-to-all whose slice r goes to CP rank r.
    """
    c = chunk_len(t.size(seq_dim), cp_size)
    dim = seq_dim % t.dim()
    shape = list(t.shape)
    shape[dim] = 2 * c
    out = t.new_empty([cp_size] + shape)
    for r in range(cp_size):
        first, second = zigzag_chunk_ids(cp_size, r)
        out[r].narrow(dim, 0, c).copy_(t.narrow(dim, first * c, c))
        out[r].narrow(dim, c, c).copy_(t.narrow(dim, second * c, c))
    return out


def gather_tensor(local: Tensor, cp_group: dist.ProcessGroup, seq_dim: int = 1) -> Tensor:
    """All-gather a sharded tensor over the CP group and restore natural order: [.., S, ..].

    For outputs and diagnostics (e.g. logits of a whole sequence); not differentiable.
    """
    cp_size = cp_group.size()
    if cp_size == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(cp_size)]
    dist.all_gather(shards, local.contiguous(), group=cp_group)
    return unshard_tensors(shards, seq_dim)
