"""The attention's QKV and output projections run over the sequence in tiles (the MLP's are in tiled_mlp.py).

Under sequence parallelism a column-parallel linear all-gathers its input over TP, [T, h] for the T
tokens of the TP group, and in backward holds that gathered input and the full-size input gradient
before the reduce-scatter: 2*h*e bytes per token, 17 GiB at T = 1M for Llama-3.1-8B in bf16, the
largest working set of a layer once the MLP is tiled (training/memory.py). The row-parallel output
projection holds the same [T, h] before its reduce-scatter. Run tile by tile, each of those buffers
covers T / tiles tokens. Nothing is recomputed: the tiles are independent calls of megatron's own
linear, each saving its own input slice.

The order of the rows. Under sequence parallelism rank r holds rows [r*L, (r+1)*L) of the sequence
(L = T / TP). Splitting the local rows into tiles and gathering tile j gives the rows
{r*L + tile j's offsets : r = 0..TP-1}, so the column-parallel outputs come in (tile, rank, offset)
order and are put back in sequence order by one `index_select`; the row-parallel projection picks
those same rows of its full-sequence input for tile j, so its reduce-scatter hands rank r back its
own slice of tile j. Without sequence parallelism the tiles are plain slices of the sequence.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor


def tile_bounds(length: int, tiles: int) -> list[tuple[int, int]]:
    """[start, end) of `tiles` consecutive slices of `length` rows (torch.tensor_split's sizes)."""
    base, extra = divmod(length, tiles)
    bounds, start = [], 0
    for j in range(tiles):
        end = start + base + (j < extra)
        bounds.append((start, end))
        start = end
    return bounds


def gathered_rows(local_len: int, tp: int, start: int, end: int) -> Tensor:
    """Sequence rows that an all-gather over TP of each rank's local rows [start, end) yields, in order."""
    offsets = torch.arange(start, end)
    return torch.cat([r * local_len + offsets for r in range(tp)])


def sequence_order(local_len: int, tp: int, bounds: list[tuple[int, int]]) -> Tensor:
    """Index that takes the concatenated gathered tiles (tile, rank, offset order) to sequence order."""
    position = torch.empty(tp * local_len, dtype=torch.long)
    offset = 0
    for start, end in bounds:
        rows = gathered_rows(local_len, tp, start, end)
        position[rows] = torch.arange(offset, offset + rows.numel())
        offset += rows.numel()
    return position


class _SequenceTiled:
    """Mixin over a megatron (or TE) linear whose forward returns (output, bias)."""

    tiled_kind: Literal["column", "row"]

    def __init__(self, *args, num_tiles: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_tiles = num_tiles
        """Sequence tiles per forward (1 = the linear unchanged)."""

    def forward(self, x: Tensor, *args, **kwargs):
        call = functools.partial(super().forward, *args, **kwargs) if args or kwargs else super().forward
        tp = self.config.tensor_model_parallel_size
        sp = self.config.sequence_parallel and tp > 1
        local = x.shape[0] if (self.tiled_kind == "column" or not sp) else x.shape[0] // tp
        tiles = min(self.num_tiles, local)
        if tiles <= 1:
            return call(x)
        bounds = tile_bounds(local, tiles)
        outs, bias = [], None
        for start, end in bounds:
            if self.tiled_kind == "row" and sp:
                part = x.index_select(0, gathered_rows(local, tp, start, end).to(x.device))
            else:
                part = x[start:end]
            out, bias = call(part)
            outs.append(out)
        out = torch.cat(outs, dim=0)
        if self.tiled_kind == "column" and sp:
            out = out.index_select(0, sequence_order(local, tp, bounds).to(out.device))
        return out, bias


@functools.lru_cache(maxsize=None)
def sequence_tiled(linear_cls: type, kind: Literal["column", "row"]) -> type:
    """`linear_cls` (e.g. megatron's ColumnParallelLinear, TE's TELayerNormColumnParallelLinear)
    with a `num_tiles` argument; a subclass, so isinstance checks and state dicts are unchanged."""
    return type(f"SequenceTiled{linear_cls.__name__}", (_SequenceTiled, linear_cls), {"tiled_kind": kind})
