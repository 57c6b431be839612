"""A whole GPTModel with CP=2 gives CP=1's loss and parameter gradients on the same batch.

The CP=1 model is the reference (single-rank SDPA, no CP code involved without documents). The
CP=2 models get the same weights, the batch sharded by `shard_batch` (tokens, labels, loss mask,
global position ids), the loss from `reduce_loss_over_dp_cp`, and their gradients summed over the
DP x CP group (what the DDP reduction does); each comm type is checked. A document-masked batch is
also run through Megatron's Attention via `packed_seq_params` (qkv_format="sbhd"), against the
CP=1 model on the same documents.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import run_distributed

SEQ, BATCH = 16, 2
CU_SEQLENS = torch.tensor([0, 7, 16, 19, 32], dtype=torch.int32)  # global, over both samples


def _batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (BATCH, SEQ + 1), generator=gen)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, 3:9] = 0
    return dict(
        tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=loss_mask,
        position_ids=torch.arange(SEQ)[None].expand(BATCH, -1).contiguous(),
    )


def _loss_and_grads(model, batch, dp_cp_group, packed_seq_params=None):
    from megatron_ultralong.training.loss import reduce_loss_over_dp_cp

    model.zero_grad(set_to_none=True)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                      packed_seq_params=packed_seq_params)
    res = reduce_loss_over_dp_cp(per_token, batch["loss_mask"], dp_cp_group)
    res.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if dp_cp_group is not None and dp_cp_group.size() > 1:
            dist.all_reduce(g, group=dp_cp_group)
        grads[name] = g
    return res.mean_loss, grads


def _model_body(rank: int, world: int) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_ultralong.parallel.cp_layout import shard_batch
    from megatron_ultralong.model import PRESETS, build_model
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    cfg = PRESETS["tiny"]
    batch = _batch()
    docs = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=CU_SEQLENS)

    # Reference: CP=1 (the two ranks are plain data-parallel replicas; each runs the whole batch).
    rt = init_runtime(ParallelConfig(context_parallel=1), seed=11, device="cpu")
    ref_model = build_model(cfg, rt)
    weights = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
    ref_loss, ref_grads = _loss_and_grads(ref_model, batch, None)
    ref_doc_loss, ref_doc_grads = _loss_and_grads(ref_model, batch, None, docs)
    assert abs(ref_doc_loss.item() - ref_loss.item()) > 1e-4, "document mask had no effect"

    for comm in ("p2p", "all_gather", "a2a"):
        rt = init_runtime(ParallelConfig(context_parallel=2, cp_comm_type=comm), seed=11, device="cpu")
        cp_group = rt.pg_collection.cp
        assert cp_group.size() == 2
        model = build_model(cfg, rt)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        local = shard_batch(batch, cp_group.size(), cp_group.rank())
        cases = [("", None, ref_loss, ref_grads)]
        if comm == "p2p":
            cases.append((" docs", docs, ref_doc_loss, ref_doc_grads))
        for tag, psp, want_loss, want_grads in cases:
            loss, grads = _loss_and_grads(model, local, rt.pg_collection.dp_cp, psp)
            torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=0, msg=f"{comm}{tag} loss")
            for name, g in grads.items():
                torch.testing.assert_close(g, want_grads[name], atol=1e-5, rtol=1e-4, msg=f"{comm}{tag} {name}")


def test_gpt_model_cp2_equals_cp1():
    run_distributed(_model_body, world_size=2)
