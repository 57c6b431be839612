"""Section cp_kernels: the CP attention kernels of one rank, every ring step, on one device.

Correctness (`cp_kernels`): for ranks 0, cp/2 and cp-1 of a zigzag CP group (the three kinds of
ring step: the own diagonal block, earlier blocks seen by both query chunks, later blocks seen by
the second chunk only), every step's partial out and lse, the merged out and lse, and every step's
dQ, dK, dV given the final out/lse are compared with a dense fp32 reference built from the global
positions alone (an explicit causal mask, the softmax written out and the attention backward of the
flash-attention paper: dS = P * (dP - rowsum(dO * O))), so no code under test enters the reference.
Each worst error is checked against a threshold (relative to the reference's largest magnitude; the
lse absolute); a miss fails the device check.

Timing (`cp_kernels_timing`, GPU): one CP rank of the 1M recipe (TP8: 4 q heads / 1 KV head,
d=128, 65,536 local tokens in zigzag chunks of 32,768, CP16): forward+backward of all ring steps of
rank 0 against ONE causal call of equal FLOPs (S/sqrt(cp) tokens); the ratio is the CP rank
efficiency (ring-flash-attention's zigzag reaches 0.90; goal >= 0.95).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gpu_sections import Context, section

TOLERANCE = {torch.float32: dict(out=1e-4, lse=1e-4, dq=1e-4, dk=1e-4, dv=1e-4),
             torch.bfloat16: dict(out=2e-2, lse=2e-2, dq=3e-2, dk=3e-2, dv=3e-2)}
"""Worst error allowed per quantity and dtype: relative to the reference's largest magnitude (at
least 1), absolute for the lse. bf16: the kernels' own self-check tolerance (kernels.self_check)."""


def _positions(ranges: list[tuple[int, int]], device: torch.device) -> Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)


def _rel_err(got: Tensor, want: Tensor) -> float:
    return (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item())


def reference_step(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Dense fp32 partial attention of one block: (scores S [b, h, n, m] with -inf where masked,
    out [b, h, n, d] (0 on rows that see no key), lse [b, h, n] (-inf there)).
    q [b, h, n, d], k/v [b, g, m, d]; query head i reads KV head i // (h / g)."""
    rep = q.size(1) // k.size(1)
    kf, vf = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
    return s, p @ vf, lse


def reference_step_backward(s: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                            scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dQ [b, h, n, d], dK/dV [b, g, m, d] (fp32) of one block given the FINAL out/lse of its rows."""
    b, h, n, d = q.shape
    g = k.size(1)
    rep = h // g
    kf, vf = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    p = torch.exp(s - lse.float()[..., None])  # masked scores are -inf: p = 0 there
    do = dout.float()
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    fold = lambda t: t.view(b, g, rep, *t.shape[2:]).sum(2)  # noqa: E731 - the GQA heads of one KV head
    return dq, fold(dk), fold(dv)


def check_rank(ctx: Context, rank: int, cp: int, n: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype,
               backend: str) -> dict[str, float]:
    """Worst error per quantity over the ring steps of `rank` (see the module docstring)."""
    from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into
    from megatron_ultralong.attention.segments import build_segments
    from megatron_ultralong.attention.softmax_merge import empty_accumulator, merge_attention_
    from megatron_ultralong.parallel.cp_layout import local_ranges

    device, seq, scale = ctx.device, n * cp, d ** -0.5
    gen = torch.Generator(device="cpu").manual_seed(1 + rank)
    q = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    dout = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    kv_blocks = [torch.randn(2, 1, kv_heads, n, d, generator=gen).to(device, dtype) for _ in range(cp)]
    q_ranges = local_ranges(seq, cp, rank)
    q_pos = _positions(q_ranges, device)
    worst = dict.fromkeys(("out", "lse", "final_out", "final_lse", "dq", "dk", "dv"), 0.0)
    out_acc, lse_acc = empty_accumulator(q)
    ref_parts = []
    steps = []
    for step in range(cp):
        src = (rank - step) % cp
        kv, k_ranges = kv_blocks[src], local_ranges(seq, cp, src)
        segs = build_segments(q_ranges, k_ranges, True)
        step_out, step_lse = empty_accumulator(q)
        attention_forward_into(step_out, step_lse, q, kv[0], kv[1], segs, scale, backend)
        merge_attention_(out_acc, lse_acc, step_out, step_lse)
        mask = _positions(k_ranges, device)[None, :] <= q_pos[:, None]
        s, ref_out, ref_lse = reference_step(q, kv[0], kv[1], mask, scale)
        seen = mask.any(-1)  # rows with at least one visible key in this block
        if seen.any():
            worst["out"] = max(worst["out"], _rel_err(step_out[:, :, seen], ref_out[:, :, seen]))
            worst["lse"] = max(worst["lse"], (step_lse[:, :, seen] - ref_lse[:, :, seen]).abs().max().item())
        if not bool(torch.isneginf(step_lse[:, :, ~seen]).all()):
            worst["lse"] = float("inf")  # a row that sees no key got a finite lse
        ref_parts.append((ref_out.double(), ref_lse.double()))
        steps.append((kv, segs, mask))  # the scores are recomputed below: 16 of them need not coexist
        del s
    # Final out/lse: the reference's partial results combined in float64.
    lses = torch.stack([lse for _, lse in ref_parts])
    ref_final_lse = torch.logsumexp(lses, dim=0)
    ref_final_out = sum(torch.exp(lse - ref_final_lse)[..., None] * o for o, lse in ref_parts)
    worst["final_out"] = _rel_err(out_acc, ref_final_out.float())
    worst["final_lse"] = (lse_acc.double() - ref_final_lse).abs().max().item()
    out_final = out_acc.to(dtype)
    for kv, segs, mask in steps:
        s = reference_step(q, kv[0], kv[1], mask, scale)[0]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=device)
        attention_backward_into(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out_final, lse_acc, segs, scale, backend)
        ref_dq, ref_dk, ref_dv = reference_step_backward(s, q, kv[0], kv[1], out_final, lse_acc, dout, scale)
        worst["dq"] = max(worst["dq"], _rel_err(dq, ref_dq))
        worst["dk"] = max(worst["dk"], _rel_err(dkv[0], ref_dk))
        worst["dv"] = max(worst["dv"], _rel_err(dkv[1], ref_dv))
    return worst


@section("cp_kernels")
def check_cp_kernels(ctx: Context) -> None:
    from megatron_ultralong.attention.kernels import select_backend

    dtype = torch.float32 if ctx.dry else torch.bfloat16
    # The check runs at a size whose dense fp32 reference fits easily (1 GiB per score matrix on GPU).
    cp, n, heads, kv_heads, d = (4, 128, 4, 1, 64) if ctx.dry else (16, 8192, 4, 1, 128)
    backend = select_backend("auto", torch.empty(0, device=ctx.device, dtype=dtype))
    ctx.record("cp_kernels", "check_shape", f"cp={cp} local={n} h={heads} g={kv_heads} d={d} {dtype} backend={backend}")
    ranks = sorted({0, cp // 2, cp - 1})
    worst = dict.fromkeys(("out", "lse", "final_out", "final_lse", "dq", "dk", "dv"), 0.0)
    for rank in ranks:
        for name, err in check_rank(ctx, rank, cp, n, heads, kv_heads, d, dtype, backend).items():
            worst[name] = max(worst[name], err)
        ctx.cleanup()
    ctx.record("cp_kernels", "checked_ranks", ranks)
    tol = TOLERANCE[dtype]
    for name, err in worst.items():
        ctx.check("cp_kernels", f"max_err_{name}", err, tol[name.removeprefix("final_")])
    time_rank(ctx, backend)


def time_rank(ctx: Context, backend: str) -> None:
    """Rank 0 of the 1M recipe's CP16 group: all ring steps vs one causal call of equal FLOPs."""
    from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into
    from megatron_ultralong.attention.segments import build_segments
    from megatron_ultralong.attention.softmax_merge import empty_accumulator
    from megatron_ultralong.parallel.cp_layout import local_ranges

    if ctx.dry:
        ctx.skip("cp_kernels_timing", "CPU dry run: kernel times are only meaningful on the GPU")
        return
    device, dtype = ctx.device, torch.bfloat16
    cp, n, heads, kv_heads, d = 16, 65536, 4, 1, 128
    seq, rank, scale = n * cp, 0, d ** -0.5
    ctx.record("cp_kernels_timing", "shape", f"cp={cp} local={n} chunk={n // 2} h={heads} g={kv_heads} d={d} "
               f"{dtype} backend={backend}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    dout = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    kv_blocks = [torch.randn(2, 1, kv_heads, n, d, generator=gen).to(device, dtype) for _ in range(cp)]
    q_ranges = local_ranges(seq, cp, rank)
    steps = [(kv_blocks[(rank - s) % cp], build_segments(q_ranges, local_ranges(seq, cp, (rank - s) % cp), True))
             for s in range(cp)]

    def ring_fwd_bwd():
        out, lse = empty_accumulator(q)
        for kv, segs in steps:
            attention_forward_into(out, lse, q, kv[0], kv[1], segs, scale, backend)
        out_q = out.to(dtype)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
        for kv, segs in steps:
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=device)
            attention_backward_into(dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], out_q, lse, segs, scale, backend)
        return out_q, dq

    t_ring = ctx.timed(ring_fwd_bwd)
    del kv_blocks, steps
    ctx.cleanup()
    # Equal FLOPs: the rank's causal work is S^2 / (2 cp) per head = one causal call of S / sqrt(cp).
    length = int(seq / math.sqrt(cp))
    qr = torch.randn(1, heads, length, d, device=device, dtype=dtype, requires_grad=True)
    kr = torch.randn(1, kv_heads, length, d, device=device, dtype=dtype, requires_grad=True)
    vr = torch.randn_like(kr, requires_grad=True)
    dr = torch.randn(1, heads, length, d, device=device, dtype=dtype)

    def one_causal():
        F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scale, enable_gqa=True).backward(dr)

    t_ref = ctx.timed(one_causal)
    flops = 4 * heads * d * seq * seq / (2 * cp) * 3.5  # fwd 2 matmuls + bwd 5, causal half
    ctx.record("cp_kernels_timing", "ring_seconds", t_ring, "s")
    ctx.record("cp_kernels_timing", "one_causal_seconds", t_ref, "s")
    ctx.record("cp_kernels_timing", "rank_efficiency", t_ref / t_ring)
    ctx.record("cp_kernels_timing", "ring_tflops", flops / t_ring / 1e12, "TFLOP/s")
