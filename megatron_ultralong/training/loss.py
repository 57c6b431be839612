"""Language-model loss under data x context parallelism: token-sum, divided by the GLOBAL token count.

Each rank of the DP x CP group holds some samples (DP) and, of each, its zigzag share of tokens
(CP). The loss that every optimizer step should follow is the mean cross-entropy over all loss
tokens of the global batch:

    L = ( sum_{ranks j} sum_{t on j} m_t * ce_t ) / N,      N = sum_{ranks j} sum_{t on j} m_t

with m_t the loss mask. Rank j therefore backpropagates

    L_j = ( sum_{t on j} m_t * ce_t ) / max(N, 1)

where N comes from an all-reduce over the DP x CP group, and the gradients are SUMMED over that
group (dL/dθ = sum_j dL_j/dθ). A rank whose tokens are all masked has L_j = 0 and zero gradients,
never 0/0: dividing by the local count instead is the NaN of Megatron-LM #1764, and averaging
per-rank means weights tokens unevenly (Megatron-LM #673/#906, Megatron-Bridge #2055).

If the gradient reduction AVERAGES over the group (Megatron DDP's default scaling 1/(dp*cp)), pass
`grads_averaged_over_group=True`: L_j is multiplied by the group size so the average is again dL/dθ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class CPLoss:
    """Result of `reduce_loss_over_dp_cp`.

    loss: scalar to call backward() on (L_j above, possibly times the group size).
    mean_loss: detached global mean cross-entropy L, the same on every rank (for logging).
    num_tokens: detached global loss-token count N (int64 scalar).
    """

    loss: Tensor
    mean_loss: Tensor
    num_tokens: Tensor


def reduce_loss_over_dp_cp(
    token_losses: Tensor,
    loss_mask: Tensor,
    dp_cp_group: Optional[dist.ProcessGroup],
    grads_averaged_over_group: bool = False,
    global_num_tokens: Optional[Tensor] = None,
) -> CPLoss:
    """Turn this rank's per-token losses into its share of the global mean (module docstring).

    Args:
        token_losses: [b, s/cp] per-token loss of this rank's tokens (any float dtype).
        loss_mask: [b, s/cp], 1 where the token counts (bool or float 0/1).
        dp_cp_group: the combined data x context-parallel group (Megatron's
            `get_data_parallel_group(with_context_parallel=True)`); None = single process.
        grads_averaged_over_group: see the module docstring.
        global_num_tokens: N when it is known in advance, e.g. the loss tokens of every
            micro-batch of an optimizer step (gradient accumulation: each micro-batch then
            backpropagates its share of the step's mean, not a mean of per-micro-batch means).
    """
    if token_losses.shape != loss_mask.shape:
        raise ValueError(f"token_losses {tuple(token_losses.shape)} != loss_mask {tuple(loss_mask.shape)}")
    mask = loss_mask.to(torch.bool)
    # where(), not multiply: a masked position's loss may be inf/nan (garbage label), and 0*inf = nan.
    local_sum = torch.where(mask, token_losses.float(), torch.zeros((), device=token_losses.device)).sum()
    # fp64: token counts of a multi-million-token batch are exact (fp32 stops at 2^24).
    stats = torch.stack([local_sum.detach().double(), mask.sum().double()])
    if dp_cp_group is not None and dp_cp_group.size() > 1:
        dist.all_reduce(stats, group=dp_cp_group)
    global_sum, count = stats[0], stats[1]
    if global_num_tokens is not None:
        count = global_num_tokens.to(device=stats.device, dtype=torch.float64).reshape(())
    denom = count.clamp(min=1.0)  # no loss token anywhere: loss 0 instead of 0/0
    loss = local_sum / denom.float()
    if grads_averaged_over_group and dp_cp_group is not None:
        loss = loss * dp_cp_group.size()
    return CPLoss(loss=loss, mean_loss=(global_sum / denom).float(), num_tokens=count.to(torch.int64))
