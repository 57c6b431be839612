"""The one log-sum-exp (online softmax) merge of partial attention results.

Attention of a query row over keys K = K1 ∪ K2 splits exactly into the two partial results
(o_i, lse_i) over K_i, with o_i = softmax-weighted mean of V over K_i and lse_i = log Σ_{K_i} exp(s):

    lse = log(exp(lse_1) + exp(lse_2))
    o   = exp(lse_1 - lse) * o_1 + exp(lse_2 - lse) * o_2

Both weights are <= 1, so nothing overflows (the blockwise form of FlashAttention's online softmax;
ring-flash-attention `utils.py::update_out_and_lse` writes the same update as a sigmoid). The merge
runs in fp32 whatever the input dtype: with bf16 partials, rounding each intermediate result
compounds over 2*cp merges (ring-flash-attention README, "Known limits").

A row with no visible key in a block (document masking) carries lse = -inf and contributes nothing;
a row with no visible key so far has lse = -inf and o = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor


def empty_accumulator(q: Tensor) -> tuple[Tensor, Tensor]:
    """A zero-key result for q [b, h, s, d]: out zeros fp32 [b, h, s, d], lse -inf fp32 [b, h, s]."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def final_output(out: Tensor, dtype: torch.dtype) -> Tensor:
    """The merged fp32 out [b, h, s, d] in `dtype`, stored in Megatron's [s, b, h, d] memory order.

    Core attention hands Megatron [s, b, h*d]; from this layout that is a view, so the tensor the
    autograd Function saves for backward and the one linear_proj saves are the same storage
    (a [b, h, s, d]-contiguous result would be copied, keeping two per layer).
    """
    b, h, s, d = out.shape
    return torch.empty((s, b, h, d), dtype=dtype, device=out.device).permute(1, 2, 0, 3).copy_(out)


def merge_attention_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Merge one partial block into the running result, in place.

    Args:
        out: running output, fp32 [b, h, s, d] (may be a view of a larger accumulator).
        lse: running log-sum-exp, fp32 [b, h, s].
        block_out: the block's output [b, h, s, d], any float dtype.
        block_lse: the block's log-sum-exp [b, h, s] (fp32 from every kernel).
    """
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"merge accumulators must be fp32, got out={out.dtype}, lse={lse.dtype}")
    block_lse = block_lse.float()
    new_lse = torch.logaddexp(lse, block_lse)
    # Rows with no key on either side keep lse = -inf; subtracting 0 there gives weights exp(-inf) = 0
    # instead of exp(-inf - -inf) = nan.
    ref = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - ref).unsqueeze(-1)
    w_new = torch.exp(block_lse - ref).unsqueeze(-1)
    out.mul_(w_old).addcmul_(w_new, block_out)  # in place: no output-sized temporary
    lse.copy_(new_lse)



def merge_attention(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge any number of partial results over disjoint key sets: returns (out fp32, lse fp32).

    Used by cached decoding under CP (eval/kv_cache.py): each rank's partial result over its own
    cache shard, gathered, merged in the same order on every rank.
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need matching non-empty lists, got {len(outs)} outputs, {len(lses)} lse")
    out, lse = empty_accumulator(outs[0])
    for block_out, block_lse in zip(outs, lses):
        merge_attention_(out, lse, block_out, block_lse)
    return out, lse
