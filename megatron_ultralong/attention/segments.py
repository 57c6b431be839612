"""Which (query rows, key rows) sub-blocks of a block attend to each other: causality and documents.

Every CP variant computes attention between a set of local query rows and a set of key rows whose
GLOBAL positions are a few contiguous ranges (the zigzag chunks of `parallel/cp_layout.py`). This module
turns such a block into a list of `Segment`s, rectangles that are each either fully visible or
causal on their diagonal, so any kernel that does "full" and "causal square" attention computes it
exactly; fully masked sub-blocks produce no segment and are therefore skipped.

Document masking: `DocBoundaries` holds, per sample of the batch, the global start offsets of its
documents plus the sequence end, e.g. ((0, 5, 18, 32), (0, 32)) for b=2, S=32. A token attends only
to keys of its own document. Built from `cu_seqlens` over the unsharded sequences
(`parse_cu_seqlens`); it is tiny and replicated on every rank, so no rank needs another's tokens to
know the mask.
"""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

Range = tuple[int, int]
"""Global [start, end) positions of a contiguous run of tokens."""

DocBoundaries = tuple[tuple[int, ...], ...]
"""Per sample: sorted document starts, beginning with 0 and ending with the sequence length S."""


@dataclass(frozen=True)
class Segment:
    """A rectangle of local rows: queries [q0, q1) x keys [k0, k1) of the block's local tensors.

    `batch` is None when the segment applies to every sample (no document mask), else the sample
    index. `causal` means the query and key rows cover the same global positions and row i sees
    keys 0..i (a top-left-aligned causal square); otherwise every key is visible.
    """

    batch: Optional[int]
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def parse_cu_seqlens(cu_seqlens: Tensor, batch: int, seq_len: int) -> DocBoundaries:
    """Global document boundaries from cu_seqlens [n_docs + 1] over the b unsharded sequences.

    `cu_seqlens` follows Megatron's packed convention: cumulative document lengths over the
    concatenation of the b samples of global length S each, from 0 to b*S. Every sample boundary
    k*S must itself be a document boundary (documents do not span samples).
    """
    offsets = [int(x) for x in cu_seqlens.tolist()]  # one tiny device->host copy per forward
    total = batch * seq_len
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(
            f"cu_seqlens={offsets[:8]}{'...' if len(offsets) > 8 else ''}: must start at 0 and end "
            f"at batch*seq_len = {batch}*{seq_len} = {total} (global, unsharded lengths)"
        )
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")
    docs = []
    for i in range(batch):
        lo, hi = i * seq_len, (i + 1) * seq_len
        if lo not in offsets:
            raise ValueError(f"cu_seqlens has no boundary at sample start {lo}: documents may not span samples")
        docs.append(tuple(o - lo for o in offsets if lo <= o <= hi))
    return tuple(docs)


_last_parsed: Optional[tuple] = None
"""(weakref to cu_seqlens, its _version, weakref to cu_seqlens_kv, batch, seq_len, docs): the one
entry of `document_boundaries`' cache."""


def document_boundaries(cu_seqlens: Tensor, cu_seqlens_kv: Optional[Tensor], batch: int, seq_len: int) -> DocBoundaries:
    """`parse_cu_seqlens` once per step instead of once per layer.

    Every layer's core attention receives the same cu_seqlens tensor within a step; reading it is a
    device->host copy (and a stream sync on GPU), so the parsed result is kept for as long as the
    same, unmodified tensor comes back. The cu_seqlens_kv == cu_seqlens check is cached with it.
    """
    global _last_parsed
    entry = _last_parsed
    if entry is not None:
        cu_ref, version, kv_ref, b, s, docs = entry
        kv_same = (kv_ref is None and cu_seqlens_kv is None) or (kv_ref is not None and kv_ref() is cu_seqlens_kv)
        if cu_ref() is cu_seqlens and version == cu_seqlens._version and kv_same and (b, s) == (batch, seq_len):
            return docs
    if cu_seqlens_kv is not None and cu_seqlens_kv is not cu_seqlens:
        if not (cu_seqlens_kv.shape == cu_seqlens.shape and bool((cu_seqlens_kv.cpu() == cu_seqlens.cpu()).all())):
            raise ValueError("packed_seq_params.cu_seqlens_kv differs from cu_seqlens_q (self-attention)")
    docs = parse_cu_seqlens(cu_seqlens, batch, seq_len)
    kv_ref = None if cu_seqlens_kv is None else weakref.ref(cu_seqlens_kv)
    _last_parsed = (weakref.ref(cu_seqlens), cu_seqlens._version, kv_ref, batch, seq_len, docs)
    return docs


def _relation(q: Range, k: Range, causal: bool) -> str:
    """'full', 'diag' or 'skip' for chunk-aligned ranges (equal, or disjoint)."""
    if not causal:
        return "full"
    if k == q:
        return "diag"
    if k[1] <= q[0]:
        return "full"
    if k[0] >= q[1]:
        return "skip"
    raise ValueError(f"query range {q} and key range {k} overlap partially: not chunk-aligned")


def _coalesce(segments: list[Segment]) -> list[Segment]:
    """Join full segments that touch along keys, then along queries: fewer, larger kernel calls."""
    for along_k in (True, False):
        merged: list[Segment] = []
        for s in segments:
            p = merged[-1] if merged else None
            if p is not None and not p.causal and not s.causal and p.batch == s.batch:
                if along_k and (p.q0, p.q1) == (s.q0, s.q1) and p.k1 == s.k0:
                    merged[-1] = Segment(p.batch, p.q0, p.q1, p.k0, s.k1, False)
                    continue
                if not along_k and (p.k0, p.k1) == (s.k0, s.k1) and p.q1 == s.q0:
                    merged[-1] = Segment(p.batch, p.q0, s.q1, p.k0, p.k1, False)
                    continue
            merged.append(s)
        segments = merged
        if along_k:  # group equal key ranges next to each other for the query pass
            segments = sorted(segments, key=lambda s: (s.batch is not None, s.batch or 0, s.k0, s.k1, s.q0))
    return segments


def build_segments(
    q_ranges: Sequence[Range],
    k_ranges: Sequence[Range],
    causal: bool,
    docs: Optional[DocBoundaries] = None,
) -> list[Segment]:
    """Segments of a block whose local query rows are `q_ranges` and key rows `k_ranges`, in order.

    Ranges are global positions; local rows are numbered by concatenating the ranges. With `docs`,
    each chunk pair is further cut at document boundaries (one segment per document and sample).
    """
    if causal and docs is None and _same_ascending(q_ranges, k_ranges):
        # A rank's own block (ring step 0: chunks r and 2cp-1-r against themselves). Its exact mask
        # is causal over the local rows, because every earlier range lies wholly before every later
        # one: one causal kernel call instead of three (causal, full, causal), same FLOPs.
        n = sum(r[1] - r[0] for r in q_ranges)
        return [Segment(None, 0, n, 0, n, True)]
    segments: list[Segment] = []
    q_off = 0
    for q in q_ranges:
        k_off = 0
        for k in k_ranges:
            rel = _relation(q, k, causal)
            if rel != "skip":
                if docs is None:
                    segments.append(Segment(None, q_off, q_off + q[1] - q[0], k_off, k_off + k[1] - k[0], rel == "diag"))
                else:
                    for b, starts in enumerate(docs):
                        segments.extend(_doc_segments(b, starts, q, k, q_off, k_off, rel == "diag"))
            k_off += k[1] - k[0]
        q_off += q[1] - q[0]
    return _coalesce(segments)


def _same_ascending(q_ranges: Sequence[Range], k_ranges: Sequence[Range]) -> bool:
    """Query and key ranges identical, each range ending before the next one starts."""
    q, k = list(q_ranges), list(k_ranges)
    return q == k and all(a[1] <= b[0] for a, b in zip(q, q[1:]))


def _doc_segments(
    b: int, starts: tuple[int, ...], q: Range, k: Range, q_off: int, k_off: int, diag: bool
) -> list[Segment]:
    """Per-document rectangles of one chunk pair of sample b."""
    out = []
    lo, hi = min(q[0], k[0]), max(q[1], k[1])  # only documents starting before hi can meet both
    first = bisect.bisect_right(starts, lo) - 1
    for i in range(max(first, 0), len(starts) - 1):
        ds, de = starts[i], starts[i + 1]
        if ds >= hi:
            break
        qs, qe = max(q[0], ds), min(q[1], de)
        ks, ke = max(k[0], ds), min(k[1], de)
        if qs < qe and ks < ke:
            out.append(Segment(b, q_off + qs - q[0], q_off + qe - q[0], k_off + ks - k[0], k_off + ke - k[0], diag))
    return out
