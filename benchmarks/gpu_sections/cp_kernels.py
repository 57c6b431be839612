"""Section cp_kernels: one CP rank of the 1M recipe on one GPU, all its ring steps.

TP8 shapes (4 q heads / 1 KV head, d=128), 65,536 local tokens in zigzag chunks of 32,768, CP16:
forward+backward of every ring step of rank 0 against ONE causal call of equal FLOPs (S/sqrt(cp)
tokens); the ratio is the CP rank efficiency (ring-flash-attention's zigzag reaches 0.90; goal
>= 0.95). Also the errors of the ring result against an SDPA reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpu_sections import Context, section


@section("cp_kernels")
def check_cp_kernels(ctx: Context) -> None:
    """Rank 0 of a CP group, simulated on one device: all ring steps vs one causal call."""
    from megatron_ultralong.attention.kernels import attention_backward_into, attention_forward_into, select_backend
    from megatron_ultralong.attention.segments import build_segments
    from megatron_ultralong.attention.softmax_merge import empty_accumulator
    from megatron_ultralong.parallel.cp_layout import local_ranges

    device, dry = ctx.device, ctx.dry
    cp, n, heads, kv_heads, d = (4, 256, 4, 1, 64) if dry else (16, 65536, 4, 1, 128)
    dtype = torch.float32 if dry else torch.bfloat16
    seq, rank = n * cp, 0
    backend = select_backend("auto", torch.empty(0, device=device, dtype=dtype))
    ctx.record("cp_kernels", "shape", f"cp={cp} local={n} chunk={n // 2} h={heads} g={kv_heads} d={d} {dtype} backend={backend}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    dout = torch.randn(1, heads, n, d, generator=gen).to(device, dtype)
    # Every rank's K/V block, as the ring would deliver them (only g KV heads).
    kv_blocks = [torch.randn(2, 1, kv_heads, n, d, generator=gen).to(device, dtype) for _ in range(cp)]
    q_ranges, scale = local_ranges(seq, cp, rank), d ** -0.5
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

    out, dq = ring_fwd_bwd()
    # Reference: SDPA over the rows of rank 0 against the whole sequence in natural order.
    check_rows = min(n, 2048)
    pos = torch.cat([torch.arange(a, b) for a, b in q_ranges]).to(device)[:check_rows]
    k_full = torch.empty(1, kv_heads, seq, d, device=device, dtype=dtype)
    v_full = torch.empty_like(k_full)
    for src in range(cp):
        idx = torch.cat([torch.arange(a, b) for a, b in local_ranges(seq, cp, src)]).to(device)
        k_full[:, :, idx], v_full[:, :, idx] = kv_blocks[src][0], kv_blocks[src][1]
    rq = q[:, :, :check_rows].float().requires_grad_()
    keys = int(pos.max()) + 1  # the checked rows see no key beyond their last position
    mask = torch.arange(keys, device=device)[None, :] <= pos[:, None]
    ref = F.scaled_dot_product_attention(rq, k_full[:, :, :keys].float(), v_full[:, :, :keys].float(),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    ref.backward(dout[:, :, :check_rows].float())
    ctx.record("cp_kernels", "max_err_out", (out[:, :, :check_rows].float() - ref).abs().max().item())
    ctx.record("cp_kernels", "max_err_dq", (dq[:, :, :check_rows] - rq.grad).abs().max().item())
    if dry:
        ctx.skip("cp_kernels_timing", "CPU dry run: kernel times are only meaningful on the GPU")
        return
    t_ring = ctx.timed(ring_fwd_bwd)
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
    ctx.record("cp_kernels", "ring_seconds", t_ring, "s")
    ctx.record("cp_kernels", "one_causal_seconds", t_ref, "s")
    ctx.record("cp_kernels", "rank_efficiency", t_ref / t_ring)
    ctx.record("cp_kernels", "ring_tflops", flops / t_ring / 1e12, "TFLOP/s")
