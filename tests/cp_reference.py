"""Independent references for the CP tests: dense attention on the GLOBAL tensors, in float64.

Nothing here uses the plugin's CP code: the mask is built from global positions and document ids
directly, and gradients come from autograd through plain softmax.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def doc_ids(starts: Sequence[int], seq_len: int) -> Tensor:
    """Document index of every position [seq_len] from document starts (0, ..., seq_len)."""
    ids = torch.zeros(seq_len, dtype=torch.long)
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        ids[a:b] = i
    return ids


def dense_mask(seq_len: int, batch: int, causal: bool, docs: Optional[Sequence[Sequence[int]]]) -> Tensor:
    """Boolean visibility [b, S, S] (True = query row may see key column)."""
    pos = torch.arange(seq_len)
    base = pos[:, None] >= pos[None, :] if causal else torch.ones(seq_len, seq_len, dtype=torch.bool)
    masks = []
    for i in range(batch):
        m = base.clone()
        if docs is not None:
            ids = doc_ids(docs[i], seq_len)
            m &= ids[:, None] == ids[None, :]
        masks.append(m)
    return torch.stack(masks)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, docs: Optional[Sequence[Sequence[int]]] = None
) -> Tensor:
    """q [b, h, S, d], k/v [b, g, S, d] (any dtype) -> out [b, h, S, d] in float64, differentiable."""
    b, h, s, _ = q.shape
    rep = h // k.size(1)
    k64 = k.double().repeat_interleave(rep, dim=1)
    v64 = v.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k64) * scale
    scores = scores.masked_fill(~dense_mask(s, b, causal, docs)[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v64)


def reference_lse(q: Tensor, k: Tensor, scale: float, mask: Optional[Tensor] = None) -> Tensor:
    """log-sum-exp of the scaled scores [b, h, sq] in float64 (mask [sq, sk] True = visible)."""
    rep = q.size(1) // k.size(1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(rep, dim=1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)
