"""One block-attention interface returning (out, lse), with its explicit backward.

Context-parallel attention needs, for each block of (local queries, some keys), the partial output
AND its log-sum-exp, so blocks can be merged (softmax_merge.py), and a backward that takes the FINAL
merged output and lse (the flash-attention backward identity: dS = P * (dP - rowsum(dO * O)) with
P = exp(S - lse_final) is exact per block). Public `F.scaled_dot_product_attention` returns neither,
so this module calls the ops underneath it; all private-API handling lives here only.

Backends (`select_backend`; kernels.BACKENDS):
- "sdpa": PyTorch's own ops that return the lse; always available, the fallback.
    CPU:            aten._scaled_dot_product_flash_attention_for_cpu (+ _backward); GQA native.
    CUDA fp16/bf16: aten._scaled_dot_product_flash_attention (+ _backward); K/V heads expanded
                    locally (only within this rank; nothing repeated travels).
    CUDA fp32:      aten._scaled_dot_product_efficient_attention (+ _backward); its lse is
                    padded to a multiple of 32 rows: sliced after the forward, padded again for
                    the backward (which reads it in blocks of 32 rows).
- "cudnn": aten._scaled_dot_product_cudnn_attention (+ _backward), CUDA fp16/bf16; it returns the
  lse when asked (compute_log_sumexp=True). K/V heads expanded locally.
- "flash_attn" (FlashAttention-2) and "fa3" (FlashAttention-3, Hopper): flash_backends.py, bound
  to the installed version once; GQA native.
- "auto": on CUDA fp16/bf16, the first of fa3, cudnn, flash_attn that is available AND passes a
  tiny forward/backward self-check against F.scaled_dot_product_attention (once per process,
  device and dtype); otherwise "sdpa". A package that imports but computes wrongly (a binding that
  no longer matches its version) is thus never used silently.
Transformer Engine is not needed for any of them.

Shapes: q [b, h, s_q, d], k/v [b, g, s_k, d] with h % g == 0 (GQA heads not repeated),
out [b, h, s_q, d] in q's dtype, lse fp32 [b, h, s_q].
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Literal, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_ultralong.attention.flash_backends import load_binding
from megatron_ultralong.attention.segments import Segment
from megatron_ultralong.attention.softmax_merge import merge_attention_

logger = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "sdpa", "cudnn", "flash_attn", "fa3"]
"""Block kernel: "auto" (the first of AUTO_ORDER that passes a self-check on CUDA half precision, else
"sdpa"), or one by name."""
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
AUTO_ORDER = ("fa3", "cudnn", "flash_attn")
"""Preference of "auto" on CUDA half precision (fastest first on Hopper); "sdpa" closes the list."""

_aten = torch.ops.aten


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    """[b, g, s, d] -> [b, h, s, d] for kernels without native GQA (local, never communicated)."""
    return t if t.size(1) == heads else t.repeat_interleave(heads // t.size(1), dim=1)


def _fold_kv_grad(dt: Tensor, groups: int) -> Tensor:
    """Inverse of `_expand_kv` for gradients: sum the h/g query heads that shared a KV head."""
    if dt.size(1) == groups:
        return dt
    b, h, s, d = dt.shape
    return dt.view(b, groups, h // groups, s, d).sum(dim=2)


def _no_dropout_rng(device: torch.device) -> tuple[Tensor, Tensor]:
    """The (philox seed, offset) pair the CUDA forward returns; never read with dropout_p = 0."""
    return torch.empty(2, dtype=torch.int64, device=device), torch.empty((), dtype=torch.int64, device=device)


# --- PyTorch SDPA ops -----------------------------------------------------------------------------
# Device dispatch is "cpu" vs anything else, so the CUDA branches also run on meta tensors (tests).

def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    h = q.size(1)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    if q.dtype in (torch.float16, torch.bfloat16):
        res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    res = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return res[0], res[1][..., : q.size(2)]


EFFICIENT_LSE_ALIGN = 32
"""PyTorch's memory-efficient attention pads its lse to a multiple of 32 query rows (`kAlignLSE`,
aten/src/ATen/native/transformers/cuda/mem_eff_attention/kernel_forward.h), and its backward loads
it in blocks of that size."""


def _pad_lse(lse: Tensor, align: int = EFFICIENT_LSE_ALIGN) -> Tensor:
    """lse [b, h, s] -> [b, h, ceil(s / align) * align], the layout the efficient backward reads.

    The forward's padding is never written; here it is +inf, so the padded rows' probabilities
    exp(score - lse) are exactly 0 in whatever the kernel computes for them.
    """
    pad = -lse.size(-1) % align
    return lse if pad == 0 else F.pad(lse, (0, pad), value=float("inf"))


def _sdpa_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "cpu":
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
        return dq, dk, dv
    h, g = q.size(1), k.size(1)
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    if q.dtype in (torch.float16, torch.bfloat16):
        # cum_seq_q/k: what the dense forward returns, i.e. undefined (None). A defined tensor, even
        # an empty one, sends PyTorch's CUDA kernel down its varlen branch (batch = numel - 1).
        seed, offset = _no_dropout_rng(q.device)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse, None, None, q.size(2), k.size(2), 0.0, causal, seed, offset, scale=scale
        )
    else:
        empty = torch.empty(0, device=q.device)
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, ke, ve, None, out, _pad_lse(lse), empty, empty, 0.0, [True, True, True, False], causal, scale=scale
        )
    return dq, _fold_kv_grad(dk, g), _fold_kv_grad(dv, g)


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    h = q.size(1)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    res = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    lse = res[1]
    return res[0], (lse.squeeze(-1) if lse.dim() == 4 else lse).float()  # [b, h, s, 1] in torch >= 2.5


def _cudnn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    h, g = q.size(1), k.size(1)
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    seed, offset = _no_dropout_rng(q.device)
    # attn_bias and cum_seq_q/k undefined (None): dense inputs, no bias, as in the forward.
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(), q, ke, ve, out.contiguous(), lse.unsqueeze(-1).contiguous(), seed, offset, None, None,
        None, q.size(2), k.size(2), 0.0, causal, scale=scale,
    )
    return dq, _fold_kv_grad(dk, g), _fold_kv_grad(dv, g)


def _flash_package(name: str) -> Callable:
    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
        return load_binding(name).forward(q, k, v, scale, causal)

    def backward(*args) -> tuple[Tensor, Tensor, Tensor]:
        return load_binding(name).backward(*args)

    return forward, backward


_FORWARD: dict[str, Callable] = {"sdpa": _sdpa_forward, "cudnn": _cudnn_forward}
_BACKWARD: dict[str, Callable] = {"sdpa": _sdpa_backward, "cudnn": _cudnn_backward}
for _name in ("flash_attn", "fa3"):
    _FORWARD[_name], _BACKWARD[_name] = _flash_package(_name)


# --- backend choice -------------------------------------------------------------------------------

def _available(name: str, q: Tensor) -> bool:
    """Whether backend `name` can run on q's device and dtype at all (before the self-check)."""
    if name == "sdpa":
        return True
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if name == "cudnn":
        return hasattr(_aten, "_scaled_dot_product_cudnn_attention") and torch.backends.cudnn.is_available()
    return load_binding(name) is not None


def self_check(forward: Callable, backward: Callable, device: torch.device, dtype: torch.dtype,
               tol: float = 3e-2) -> tuple[bool, str]:
    """Run one GQA block (causal and full) through a backend and compare out, lse and the gradients
    with F.scaled_dot_product_attention in fp32 autograd. Returns (passed, reason)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, g, s, d = 1, 4, 2, 128, 64
    q, k, v, dout = (torch.randn(b, n, s, d, generator=gen).to(device, dtype) for n in (h, g, g, h))
    scale = d ** -0.5
    try:
        for causal in (True, False):
            out, lse = forward(q, k, v, scale, causal)
            dq, dk, dv = backward(dout, q, k, v, out, lse, scale, causal)
            # "auto" is first resolved where grad is off: inside an autograd Function's forward (the CP
            # attention) or under torch.no_grad() (evaluation). The reference's autograd must not
            # depend on that, or every backend would fail here and "sdpa" be pinned for the process.
            with torch.enable_grad():
                ref_q, ref_k, ref_v = (t.detach().float().clone().requires_grad_() for t in (q, k, v))
                ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=causal, scale=scale,
                                                     enable_gqa=True)
                ref.backward(dout.float())
            with torch.no_grad():
                scores = (ref_q @ _expand_kv(ref_k, h).transpose(-1, -2)) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=device).triu(1), float("-inf"))
            pairs = (("out", out, ref), ("lse", lse, scores.logsumexp(-1)), ("dq", dq, ref_q.grad),
                     ("dk", dk, ref_k.grad), ("dv", dv, ref_v.grad))
            for name, got, want in pairs:
                if got.shape != want.shape:
                    return False, f"{name} shape {tuple(got.shape)} != {tuple(want.shape)}"
                err = (got.float() - want.detach()).abs().max().item()
                if not err <= tol * max(1.0, want.detach().abs().max().item()):
                    return False, f"{name} max error {err:.3g} (causal={causal})"
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use this backend"
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def _auto_eligible(q: Tensor) -> bool:
    """Whether "auto" looks past "sdpa" for q: the accelerated kernels are CUDA half precision only."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


AUTO_CHOSEN: dict[tuple[str, str], str] = {}
"""(device, dtype) -> what "auto" resolved to there, as strings (reports: benchmarks/gpu_check.py)."""


@functools.lru_cache(maxsize=None)
def _auto_choice(device: torch.device, dtype: torch.dtype) -> str:
    probe = torch.empty(0, device=device, dtype=dtype)
    choice = "sdpa"
    for name in AUTO_ORDER:
        if not _available(name, probe):
            continue
        ok, reason = self_check(_FORWARD[name], _BACKWARD[name], device, dtype)
        if ok:
            logger.info("attention backend auto -> %s (%s, %s)", name, device, dtype)
            choice = name
            break
        logger.warning("attention backend %s failed its self-check, not used: %s", name, reason)
    AUTO_CHOSEN[(str(device), str(dtype))] = choice
    return choice


def select_backend(backend: str, q: Tensor) -> str:
    """Resolve "auto" (see the module docstring); refuse an explicit backend that cannot run on q."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        return _auto_choice(q.device, q.dtype) if _auto_eligible(q) else "sdpa"
    if not _available(backend, q):
        raise ValueError(
            f"attention backend={backend!r} needs CUDA fp16/bf16 tensors and its package "
            f"(got {q.device.type} {q.dtype}); 'sdpa' runs everywhere"
        )
    return backend


def varlen_kernel(backend: str, q: Tensor) -> Optional[Callable[..., Tensor]]:
    """The packed-documents kernel of the backend `backend` resolves to for q, or None.

    flash-attn and FA3 have one (`flash_attn_varlen_func`, flash_backends.FlashBinding.varlen):
    (q [t, h, d], k/v [t, g, d], cu_seqlens int32 [n + 1], max_seqlen, scale, causal) -> out
    [t, h, d], differentiable. PyTorch's SDPA ops and cuDNN through them have none here, so their
    callers attend per document.
    """
    name = select_backend(backend, q)
    if name not in ("flash_attn", "fa3"):
        return None
    binding = load_binding(name)
    return binding.varlen if binding is not None else None


# --- the interface --------------------------------------------------------------------------------

def block_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """One block: q [b, h, sq, d], k/v [b, g, sk, d] -> (out [b, h, sq, d], lse fp32 [b, h, sq]).

    `causal` means a square block on the diagonal (sq == sk, row i sees keys 0..i); otherwise full.
    """
    if causal and q.size(2) != k.size(2):
        raise ValueError(f"causal block must be square, got sq={q.size(2)}, sk={k.size(2)}")
    if q.size(1) % k.size(1):
        raise ValueError(f"query heads {q.size(1)} not divisible by KV heads {k.size(1)}")
    return _FORWARD[select_backend(backend, q)](q, k, v, scale, causal)


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the FINAL out [b, h, sq, d] and lse [b, h, sq] of these rows."""
    return _BACKWARD[select_backend(backend, q)](dout, q, k, v, out, lse.contiguous(), scale, causal)


def _rows(seg: Segment) -> slice:
    return slice(None) if seg.batch is None else slice(seg.batch, seg.batch + 1)


def attention_forward_into(
    out_acc: Tensor, lse_acc: Tensor, q: Tensor, k: Tensor, v: Tensor, segments: Sequence[Segment],
    scale: float, backend: str = "auto",
) -> None:
    """Attend q [b, h, sq, d] to k/v [b, g, sk, d] over `segments`, merging into the fp32 running
    result out_acc [b, h, sq, d] / lse_acc [b, h, sq] (softmax_merge). Masked rows are untouched."""
    for seg in segments:
        b = _rows(seg)
        block_out, block_lse = block_forward(
            q[b, :, seg.q0 : seg.q1], k[b, :, seg.k0 : seg.k1], v[b, :, seg.k0 : seg.k1], scale, seg.causal, backend
        )
        merge_attention_(out_acc[b, :, seg.q0 : seg.q1], lse_acc[b, :, seg.q0 : seg.q1], block_out, block_lse)


def attention_backward_into(
    dq_acc: Tensor, dk_acc: Tensor, dv_acc: Tensor, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
    out: Tensor, lse: Tensor, segments: Sequence[Segment], scale: float, backend: str = "auto",
) -> None:
    """Add the gradients of every segment to fp32 dq_acc [b, h, sq, d], dk_acc/dv_acc [b, g, sk, d].

    `out` (q's dtype) and `lse` (fp32) are the final merged results of the query rows, so each
    segment's gradient is its exact share of the full-attention gradient.
    """
    for seg in segments:
        b, qr, kr = _rows(seg), slice(seg.q0, seg.q1), slice(seg.k0, seg.k1)
        dq, dk, dv = block_backward(
            dout[b, :, qr], q[b, :, qr], k[b, :, kr], v[b, :, kr], out[b, :, qr], lse[b, :, qr],
            scale, seg.causal, backend,
        )
        dq_acc[b, :, qr] += dq
        dk_acc[b, :, kr] += dk
        dv_acc[b, :, kr] += dv
