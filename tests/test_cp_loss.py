"""Loss under DP x CP == the single-process mean over all loss tokens, including a rank with none."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from megatron_ultralong.parallel.cp_layout import shard_tensor
from megatron_ultralong.training.loss import reduce_loss_over_dp_cp

DP, CP, SEQ, VOCAB = 2, 2, 8, 11


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: logits [b, s, V], labels [b, s] -> [b, s].

    Labels of masked positions may be anything (e.g. -100); they are clamped here and the loss
    mask zeroes their contribution later.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    safe = labels.clamp(0, logits.size(-1) - 1)
    ce = F.cross_entropy(logits.float().flatten(0, -2), safe.flatten(), reduction="none")
    return ce.view(labels.shape)


def _global_batch(all_masked: bool):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(DP, SEQ, VOCAB, generator=gen) * 3
    labels = torch.randint(0, VOCAB, (DP, SEQ), generator=gen)
    mask = (torch.rand(DP, SEQ, generator=gen) > 0.3).float()
    # DP rank 1, CP rank 1 holds sample 1's zigzag chunks 1 and 2 = positions 2..5: mask them all.
    mask[1, 2:6] = 0
    labels[1, 2:6] = -100  # garbage labels under the mask must not leak (nan/inf)
    if all_masked:
        mask.zero_()
    return logits, labels, mask


def _loss_body(rank: int, world: int) -> None:
    group = dist.group.WORLD  # the DP x CP group: rank = dp * CP + cp
    dp_rank, cp_rank = divmod(rank, CP)
    for all_masked in (False, True):
        logits, labels, mask = _global_batch(all_masked)
        # Single-process reference: mean CE over every loss token of the global batch.
        ref_logits = logits.clone().requires_grad_()
        ce = torch.nn.functional.cross_entropy(
            ref_logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none"
        ).view(DP, SEQ)
        ref = (ce * mask).sum() / mask.sum().clamp(min=1)
        ref.backward()

        local = [shard_tensor(t[dp_rank : dp_rank + 1], CP, cp_rank, seq_dim=1) for t in (logits, labels, mask)]
        local_logits = local[0].clone().requires_grad_()
        res = reduce_loss_over_dp_cp(token_cross_entropy(local_logits, local[1]), local[2], group)
        res.loss.backward()
        assert torch.isfinite(res.loss) and torch.isfinite(local_logits.grad).all()
        if rank == 3 or all_masked:
            assert res.loss.item() == 0.0 and not local_logits.grad.any()
        total = res.loss.detach().clone()
        dist.all_reduce(total, group=group)
        torch.testing.assert_close(total, ref.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(res.mean_loss, ref.detach(), atol=1e-6, rtol=0)
        assert res.num_tokens.item() == int(mask.sum().item())
        # The gradient of the global mean w.r.t. this rank's logits is this rank's gradient.
        want = shard_tensor(ref_logits.grad[dp_rank : dp_rank + 1], CP, cp_rank, seq_dim=1)
        torch.testing.assert_close(local_logits.grad, want, atol=1e-7, rtol=0)

        averaged = reduce_loss_over_dp_cp(
            token_cross_entropy(local[0], local[1]), local[2], group, grads_averaged_over_group=True
        )
        torch.testing.assert_close(averaged.loss, res.loss.detach() * world)


def test_loss_over_dp_cp_equals_global_mean():
    run_distributed(_loss_body, world_size=DP * CP)


def test_loss_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="loss_mask"):
        reduce_loss_over_dp_cp(torch.zeros(2, 4), torch.zeros(2, 3), None)
