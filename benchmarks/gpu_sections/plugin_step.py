"""Section train_step_plugin: a training step through the plugin's own attention path.

Without documents at CP = 1 the core attention calls F.scaled_dot_product_attention, so the other
train steps never touch the plugin's kernels or its "auto". Here the batch carries a document mask
(`PackedSeqParams`, four documents), which at CP = 1 goes either through one varlen kernel call per
layer (flash-attn / FA3) or, forced here as a second run, through the ring code with one rank and
the block kernel "auto" picked. "auto" is resolved for the first time INSIDE the training step (its
process-wide cache is cleared first), and what it chose is recorded, with the kernel calls counted.
Per layer spec (local; TE when it imports): seconds and, on the GPU, peak memory.
"""
from __future__ import annotations

import traceback

import torch

from gpu_sections import Context, section
from gpu_sections.train_step import build_step, train_config


def _documents(seq: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of four documents covering one sample of `seq` tokens (uneven lengths)."""
    cuts = [0, int(seq * 0.3), int(seq * 0.55), int(seq * 0.8), seq]
    return torch.tensor(cuts, dtype=torch.int32, device=device)


@section("train_step_plugin")
def check_plugin_step(ctx: Context) -> None:
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_ultralong.attention import core_attention, kernels

    seq = 256 if ctx.dry else 32768
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=_documents(seq, ctx.device))
    counts = {"block": 0, "varlen": 0}
    real_block, real_varlen_kernel = kernels.block_forward, core_attention.varlen_kernel

    def counted_block(*args, **kwargs):
        counts["block"] += 1
        return real_block(*args, **kwargs)

    def counted_varlen_kernel(backend, q):
        kernel = real_varlen_kernel(backend, q)
        if kernel is None:
            return None

        def call(*args):
            counts["varlen"] += 1
            return kernel(*args)
        return call

    kernels.block_forward, core_attention.varlen_kernel = counted_block, counted_varlen_kernel
    try:
        for spec in ctx.layer_specs():
            prefix = "" if spec == "local" else "te_"
            for path in ("auto", "ring"):
                label = f"{prefix}{path}"
                try:
                    if path == "ring":  # the one-rank ring even where a varlen kernel exists
                        core_attention.varlen_kernel = lambda backend, q: None
                    kernels._auto_choice.cache_clear()
                    kernels.AUTO_CHOSEN.clear()
                    cfg = train_config(ctx, seq, "none", (), spec)
                    step, _ = build_step(ctx, cfg, packed_seq_params=packed)
                    ctx.cleanup()
                    counts.update(block=0, varlen=0)
                    step()  # the first call resolves "auto" inside the training step
                    if path == "auto":
                        chosen = kernels.AUTO_CHOSEN.get((str(ctx.device), str(dtype)), "sdpa")
                        ctx.record("train_step_plugin", f"{prefix}auto_backend_in_training", chosen)
                    # forward kernel calls of one step: varlen (one per layer) or per-document blocks
                    ctx.record("train_step_plugin", f"{label}_varlen_calls", counts["varlen"])
                    ctx.record("train_step_plugin", f"{label}_block_calls", counts["block"])
                    seconds = ctx.timed(step)
                    ctx.record("train_step_plugin", f"{label}_seconds", seconds, "s")
                    if ctx.device.type == "cuda":
                        peak = torch.cuda.max_memory_allocated(ctx.device)
                        ctx.record("train_step_plugin", f"{label}_peak_gib", peak / 2**30, "GiB")
                    del step
                except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others
                    ctx.record("train_step_plugin", f"{label}_error", f"{type(exc).__name__}: {exc}")
                    ctx.failed.append(f"train_step_plugin.{label}")
                    traceback.print_exc()
                finally:
                    core_attention.varlen_kernel = counted_varlen_kernel
                ctx.cleanup()
    finally:
        kernels.block_forward, core_attention.varlen_kernel = real_block, real_varlen_kernel
