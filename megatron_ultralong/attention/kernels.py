"""One block-attention interface returning (out, lse), with its explicit backward.

Context-parallel attention needs, for each block of (local queries, some keys), the partial output
AND its log-sum-exp, so blocks can be merged (softmax_merge.py), and a backward that takes the FINAL
merged output and lse (the flash-attention backward identity: dS = P * (dP - rowsum(dO * O)) with
P = exp(S - lse_final) is exact per block). Public `F.scaled_dot_product_attention` returns neither,
so this module calls the ops underneath it; all private-API handling lives here only.

Backends (chosen by `select_backend`):
- "sdpa" (default): PyTorch's own ops that return the lse.
    CPU:           aten._scaled_dot_product_flash_attention_for_cpu (+ _backward); GQA native.
    CUDA fp16/bf16: aten._scaled_dot_product_flash_attention (+ _backward); K/V heads expanded
                   locally (only within this rank; nothing repeated travels).
    CUDA fp32:     aten._scaled_dot_product_efficient_attention (+ _backward); its lse may be padded
                   to a multiple of 32 rows and is sliced.
- "flash_attn": flash-attn 2 (`flash_attn.flash_attn_interface`) when installed, CUDA fp16/bf16;
  GQA native. Import-guarded; this repository's CI has no GPU, so only "sdpa" on CPU is tested here.
Transformer Engine is not needed for any of them.

Shapes: q [b, h, s_q, d], k/v [b, g, s_k, d] with h % g == 0 (GQA heads not repeated),
out [b, h, s_q, d] in q's dtype, lse fp32 [b, h, s_q].
"""
from __future__ import annotations

import importlib.util
import inspect
from typing import Callable, Literal, Sequence, get_args

import torch
from torch import Tensor

from megatron_ultralong.attention.segments import Segment
from megatron_ultralong.attention.softmax_merge import merge_attention_

AttentionBackend = Literal["auto", "sdpa", "flash_attn"]
"""Block kernel: "auto" (flash-attn on CUDA half precision when installed, else "sdpa")."""
BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

_aten = torch.ops.aten


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_backend(backend: str, q: Tensor) -> str:
    """Resolve "auto": flash-attn for CUDA half precision when installed, else PyTorch SDPA ops."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        return "flash_attn" if q.is_cuda and half and flash_attn_available() else "sdpa"
    if backend == "flash_attn" and not (q.is_cuda and flash_attn_available()):
        raise ValueError("attention backend='flash_attn' needs CUDA tensors and the flash-attn package")
    return backend


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    """[b, g, s, d] -> [b, h, s, d] for kernels without native GQA (local, never communicated)."""
    return t if t.size(1) == heads else t.repeat_interleave(heads // t.size(1), dim=1)


def _fold_kv_grad(dt: Tensor, groups: int) -> Tensor:
    """Inverse of `_expand_kv` for gradients: sum the h/g query heads that shared a KV head."""
    if dt.size(1) == groups:
        return dt
    b, h, s, d = dt.shape
    return dt.view(b, groups, h // groups, s, d).sum(dim=2)


# --- PyTorch SDPA ops -----------------------------------------------------------------------------

def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    if not q.is_cuda:
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    h = q.size(1)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    if q.dtype in (torch.float16, torch.bfloat16):
        res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    res = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return res[0], res[1][..., : q.size(2)]


def _sdpa_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if not q.is_cuda:
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
        return dq, dk, dv
    h, g = q.size(1), k.size(1)
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    empty = torch.empty(0, device=q.device)
    if q.dtype in (torch.float16, torch.bfloat16):
        cum = torch.empty(0, dtype=torch.int32, device=q.device)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse, cum, cum, q.size(2), k.size(2), 0.0, causal, empty, empty, scale=scale
        )
    else:
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, ke, ve, None, out, lse, empty, empty, 0.0, [True, True, True, False], causal, scale=scale
        )
    return dq, _fold_kv_grad(dk, g), _fold_kv_grad(dv, g)


# --- flash-attn 2 (optional) ----------------------------------------------------------------------

def _flash_attn_call(fn: Callable, **kwargs):
    """Call a private flash-attn function with the keywords its installed version declares.

    flash-attn 2.6+ split `window_size` into left/right and added `softcap`; older releases take a
    tuple. Binding by name keeps the version handling in this one place.
    """
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kwargs["window_size"] = (kwargs.pop("window_size_left"), kwargs.pop("window_size_right"))
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    from flash_attn.flash_attn_interface import _flash_attn_forward

    # flash-attn is [b, s, h, d]; its lse is [b, h, s] fp32 already.
    res = _flash_attn_call(
        _flash_attn_forward, q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
        softcap=0.0, alibi_slopes=None, return_softmax=False,
    )
    return res[0].transpose(1, 2), res[1]


def _flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.flash_attn_interface import _flash_attn_backward

    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
    _flash_attn_call(
        _flash_attn_backward, dout=dout.transpose(1, 2).contiguous(), q=qt, k=kt, v=vt,
        out=out.transpose(1, 2).contiguous(), softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv,
        dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
        softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


_FORWARD = {"sdpa": _sdpa_forward, "flash_attn": _flash_forward}
_BACKWARD = {"sdpa": _sdpa_backward, "flash_attn": _flash_backward}


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
