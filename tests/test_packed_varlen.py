"""Packed documents at CP = 1 take ONE varlen kernel call per layer where the kernel has one.

flash-attn is replaced by its 2.8.3 stand-in (tests/flash_standins.py: the real
`flash_attn_varlen_func` signature, counting its calls) made eligible for "auto" on CPU fp32. A
tiny GPTModel with a document mask must call it exactly once per layer in forward (its backward is
the kernel's own), never run the per-document block kernels, and give the loss and every gradient
of the fallback (backend "sdpa": the ring code's per-document path, itself checked against full
attention in test_cp_attention.py). FA3's varlen is bound the same way (test_fa3_binding.py).
"""
from __future__ import annotations

import torch
from dist_utils import run_distributed

SEQ, BATCH = 16, 2
CU_SEQLENS = torch.tensor([0, 7, 16, 19, 32], dtype=torch.int32)  # global, over both samples


def _loss_and_grads(model, ids, packed):
    model.zero_grad(set_to_none=True)
    pos = torch.arange(SEQ)[None].expand(BATCH, -1).contiguous()
    loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:], packed_seq_params=packed).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _body(rank: int, world: int) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    import flash_standins
    from megatron_ultralong.attention import flash_backends, kernels
    from megatron_ultralong.model import PRESETS, build_model
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    binding = flash_backends.bind_flash_attn2(flash_standins.standin_fa27(), (2, 8, 3))
    kernels.load_binding = lambda name: binding if name == "flash_attn" else None
    kernels._available = lambda name, q: name in ("sdpa", "flash_attn")
    kernels._auto_eligible = lambda q: True
    block_calls = []
    real_block_forward = kernels.block_forward
    kernels.block_forward = lambda *a, **kw: block_calls.append(1) or real_block_forward(*a, **kw)

    cfg = PRESETS["tiny"]
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=CU_SEQLENS)
    results = {}
    for backend in ("auto", "sdpa"):
        rt = init_runtime(ParallelConfig(), seed=11, device="cpu")
        model = build_model(cfg, rt, attention_backend=backend)
        flash_standins.VarlenCalls.count = 0
        block_calls.clear()
        results[backend] = _loss_and_grads(model, ids, packed)
        if backend == "auto":
            assert flash_standins.VarlenCalls.count == cfg.num_layers, flash_standins.VarlenCalls.count
            assert not block_calls  # no per-document kernel calls
        else:
            assert flash_standins.VarlenCalls.count == 0 and block_calls
    (loss_v, grads_v), (loss_f, grads_f) = results["auto"], results["sdpa"]
    assert torch.allclose(loss_v, loss_f, atol=1e-6), (loss_v, loss_f)
    for name, g in grads_f.items():
        assert torch.allclose(grads_v[name], g, atol=1e-5, rtol=1e-4), name


def test_packed_documents_take_one_varlen_call_per_layer():
    run_distributed(_body, world_size=1)
