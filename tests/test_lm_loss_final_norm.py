"""The final RMSNorm inside each loss chunk's checkpoint (model/lm_loss.py, model/gpt.py): only its
input is kept across the loss, and the loss and every gradient equal those of the norm applied first
(fp32, TP 2 over gloo). The bytes it saves are measured by tests/test_memory_model.py's probe."""
from __future__ import annotations

import torch

from dist_utils import run_distributed
from megatron_ultralong.model.config import PRESETS

SEQ = 64


def _final_norm_body(rank, world_size, sequence_parallel):
    """The loss with the final norm inside the loss chunks equals the loss of the decoder's own
    final norm followed by the chunked loss (the order before), loss and every gradient."""
    from megatron_ultralong.model import build_model
    from megatron_ultralong.model.lm_loss import chunked_lm_loss
    from megatron_ultralong.model.stage_forward import stage_hidden
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(tensor_parallel=world_size, sequence_parallel=sequence_parallel), device="cpu")
    try:
        torch.manual_seed(0)
        model = build_model(PRESETS["tiny"], rt, loss_chunk_tokens=16)
        ids = torch.randint(0, 1000, (1, SEQ), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(SEQ)[None]

        def loss_and_grads(fn):
            loss = fn().mean()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            return loss.detach(), grads

        deferred, g1 = loss_and_grads(lambda: model(ids, pos, None, labels=ids))
        assert model.decoder.final_layernorm is not None  # restored after the call

        def reference():
            hidden = stage_hidden(model, ids, pos)  # the decoder applies the final norm
            return chunked_lm_loss(hidden, model.output_layer.weight, ids, PRESETS["tiny"].vocab_size, 16,
                                   tp_rank=rt.pg_collection.tp.rank(), sequence_parallel=sequence_parallel,
                                   tp_group=rt.pg_collection.tp)

        plain, g0 = loss_and_grads(reference)
        torch.testing.assert_close(deferred, plain, rtol=1e-6, atol=0)
        assert g1.keys() == g0.keys() and "decoder.final_layernorm.weight" in g0
        for key in g0:
            torch.testing.assert_close(g1[key], g0[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    finally:
        shutdown_runtime()


def test_final_norm_inside_the_loss_chunks_leaves_loss_and_gradients_unchanged():
    # TP 2 without sequence parallelism (GPU-only in megatron-core): the column-parallel copy must
    # come after the norm, or its weight gradient would miss the other rank's vocabulary shard.
    run_distributed(_final_norm_body, 2, args=(False,))


def _sp_final_norm_body(rank, world_size):
    """Sequence-parallel chunks (the path of every TP > 1 GPU run) with the final norm inside each
    chunk's checkpoint against the norm applied first, on CPU: megatron-core's sequence-parallel
    gather allocates on CUDA, so torch's differentiable all-gather (backward: the reduce-scatter of
    the gradients, as megatron's) stands in for it in both runs."""
    import torch.distributed.nn.functional as dist_fn
    from megatron.core import tensor_parallel

    from megatron_ultralong.model import lm_loss
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime

    tensor_parallel.gather_from_sequence_parallel_region = \
        lambda x, group=None, **_: torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=0)
    # TP 2 for the vocab-parallel cross entropy's groups; the sequence-parallel chunking is
    # chunked_lm_loss's own argument (the runtime refuses sequence parallelism on CPU).
    rt = init_runtime(ParallelConfig(tensor_parallel=world_size), device="cpu")
    group, h, local_vocab, local = rt.pg_collection.tp, 16, 24, 32
    gen = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, 2 * local_vocab - 3, (1, world_size * local), generator=torch.Generator().manual_seed(7))

    def run(deferred: bool):
        hidden = torch.randn(local, 1, h, generator=gen.manual_seed(rank)).requires_grad_()
        weight = torch.randn(local_vocab, h, generator=gen.manual_seed(10 + rank)).requires_grad_()
        torch.manual_seed(3)
        norm = torch.nn.RMSNorm(h, eps=1e-5)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen.manual_seed(5))
        args = (hidden, weight, labels, 2 * local_vocab - 3, 16, rank, True, group)
        loss = lm_loss.chunked_lm_loss(*args, final_norm=norm) if deferred else \
            lm_loss.chunked_lm_loss(norm(hidden), *args[1:])
        loss.sum().backward()
        return loss.detach(), hidden.grad, weight.grad, norm.weight.grad

    try:
        for new, old in zip(run(True), run(False)):
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)  # chunk-wise sums of the norm grad
    finally:
        shutdown_runtime()


def test_final_norm_inside_sequence_parallel_loss_chunks_leaves_loss_and_gradients_unchanged():
    run_distributed(_sp_final_norm_body, 2)
