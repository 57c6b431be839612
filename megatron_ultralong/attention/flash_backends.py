"""Block kernels from the flash-attn packages (FlashAttention-2 and -3), bound once per process.

Why not the private functions by keyword: flash-attn >= 2.7 registers `_flash_attn_forward` /
`_flash_attn_backward` as `torch.library.custom_op`s, whose `inspect.signature` is
`(*args, **kwargs)`, and flash-attn <= 2.6.3 returns `(out, q, k, v, out_padded, softmax_lse, ...)`
from the forward, so no single keyword/position rule fits both. Instead:

- forward: the PUBLIC `flash_attn_func(q, k, v, softmax_scale=, causal=, return_attn_probs=True)`,
  which returns `(out, softmax_lse, S_dmask)` in every 2.x release
  (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py). FA3's
  `flash_attn_interface.flash_attn_func` (hopper/) is bound by its signature: with a
  `return_attn_probs` parameter (commit 203b9b3d, 2025-08-29, and later) it is called with it and
  returns `(out, softmax_lse)`; without it (v2.7.4.post1 to v2.8.3) it returns `(out, softmax_lse)`
  up to commit ed209409 (2025-07-11) and only `out` after, which its signature does not tell
  apart, so the lse comes from the private `_flash_attn_forward` (a plain function in those
  builds), called by keyword with None for every other required argument; it returns
  `(out, softmax_lse, *rest)`.
- varlen (packed documents at CP = 1, core_attention.py): the public `flash_attn_varlen_func`,
  which has its own autograd backward. flash-attn 2 (2.6.3 to 2.8.3): `(q, k, v, cu_seqlens_q,
  cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, ...)` returning
  `out`; FA3: called by keyword (v2.7.4.post1 has `seqused_q/k` as required positionals, later
  builds as keywords) and returns `out` or `(out, softmax_lse)` by build.
- backward: flash-attn has no public backward that takes a given (out, lse) — the explicit
  backward of context-parallel attention needs exactly that (kernels.py) — so the private
  `_flash_attn_backward` is called POSITIONALLY with the layout of the detected version:
      >= 2.7: (dout, q, k, v, out, lse, dq, dk, dv, dropout_p, scale, causal,
               window_left, window_right, softcap, alibi_slopes, deterministic, rng_state)
      2.6.x:  (..., dropout_p, scale, causal, (window_left, window_right), softcap, alibi, det, rng)
      FA3:    (dout, q, k, v, out, lse, cu_q, cu_k, seqused_q, seqused_k, max_q, max_k,
               dq, dk, dv, scale, causal)
  Older releases are refused by name. A wrong binding cannot go unnoticed: kernels.select_backend
  runs a tiny forward/backward self-check against PyTorch's SDPA before "auto" uses a backend.

All of them take [b, s, h, d] and support GQA natively (k/v with fewer heads, never repeated).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MIN_FLASH_ATTN = (2, 6)
"""Oldest flash-attn 2 whose private backward layout is known here (2.6 added softcap)."""


@dataclass(frozen=True)
class FlashBinding:
    """One installed flash-attn package, bound: forward/backward in the [b, h, s, d] convention."""

    name: str
    """"flash_attn" (FlashAttention-2) or "fa3" (flash_attn_interface, Hopper)."""

    version: tuple[int, ...]
    forward: Callable[[Tensor, Tensor, Tensor, float, bool], tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    varlen: Optional[Callable[[Tensor, Tensor, Tensor, Tensor, int, float, bool], Tensor]] = None
    """Differentiable packed attention: (q [t, h, d], k/v [t, g, d], cu_seqlens int32 [n + 1],
    max_seqlen, scale, causal) -> out [t, h, d]; every document attends only to itself."""


def parse_version(text: str) -> tuple[int, ...]:
    """"2.7.4.post1" -> (2, 7, 4); non-numeric tails dropped."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = re.match(r"\d*", piece).group()
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # "0b1", "4post1": a pre/post-release tail ends the numeric part
            break
    return tuple(parts)


def _to_bshd(*ts: Tensor) -> list[Tensor]:
    return [t.transpose(1, 2).contiguous() for t in ts]


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _none_for_required(fn: Callable, given: tuple[str, ...]) -> dict[str, None]:
    """None for every parameter of `fn` without a default that the caller does not pass itself."""
    params = _parameters(fn)
    if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
        raise ValueError(f"{getattr(fn, '__qualname__', fn)} has no inspectable signature to bind by keyword")
    return {name: None for name, p in params.items() if p.default is p.empty and name not in given}


def _first(res: Any) -> Tensor:
    """`out` from a kernel that returns `out` or `(out, softmax_lse, ...)` depending on its build."""
    return res if isinstance(res, Tensor) else res[0]


def _out_lse(res: Any, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(res, Tensor) or len(res) < 2:
        raise RuntimeError(f"{what} returned only out, not (out, softmax_lse)")
    return res[0], res[1]


def bind_flash_attn2(module: Any, version: tuple[int, ...]) -> FlashBinding:
    """Bind flash-attn 2.x (`module` is `flash_attn.flash_attn_interface`)."""
    if version[:2] < MIN_FLASH_ATTN:
        raise ValueError(
            f"flash-attn {'.'.join(map(str, version))} is too old: need >= "
            f"{'.'.join(map(str, MIN_FLASH_ATTN))} (or use attention backend 'sdpa'/'cudnn')"
        )
    split_window = version[:2] >= (2, 7)  # 2.7 made the ops custom_ops with window left/right ints
    public_forward, private_backward = module.flash_attn_func, module._flash_attn_backward

    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
        qt, kt, vt = _to_bshd(q, k, v)
        out, lse, _ = public_forward(qt, kt, vt, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out.transpose(1, 2), lse  # lse is [b, h, s] fp32 already

    def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                 causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        dot, qt, kt, vt, ot = _to_bshd(dout, q, k, v, out)
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        window: tuple = (-1, -1) if split_window else ((-1, -1),)
        private_backward(dot, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv, 0.0, scale, causal,
                         *window, 0.0, None, False, None)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    public_varlen = getattr(module, "flash_attn_varlen_func", None)

    def varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float, causal: bool) -> Tensor:
        return _first(public_varlen(q, k, v, cu, cu, max_len, max_len, 0.0, softmax_scale=scale, causal=causal))

    return FlashBinding("flash_attn", version, forward, backward, varlen if public_varlen else None)


def bind_fa3(module: Any, version: tuple[int, ...]) -> FlashBinding:
    """Bind FlashAttention-3 (`module` is `flash_attn_interface` from flash-attention's hopper/)."""
    public_forward, private_backward = module.flash_attn_func, module._flash_attn_backward
    if "return_attn_probs" in _parameters(public_forward):
        def raw_forward(qt: Tensor, kt: Tensor, vt: Tensor, scale: float, causal: bool) -> Any:
            return public_forward(qt, kt, vt, softmax_scale=scale, causal=causal, return_attn_probs=True)
        what = "flash_attn_interface.flash_attn_func"
    else:  # the public function may return only `out` (module docstring): the private one, by keyword
        private_forward = module._flash_attn_forward
        fill = _none_for_required(private_forward, ("q", "k", "v", "softmax_scale", "causal"))

        def raw_forward(qt: Tensor, kt: Tensor, vt: Tensor, scale: float, causal: bool) -> Any:
            return private_forward(qt, kt, vt, softmax_scale=scale, causal=causal, **fill)
        what = "flash_attn_interface._flash_attn_forward"

    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
        out, lse = _out_lse(raw_forward(*_to_bshd(q, k, v), scale, causal), what)
        return out.transpose(1, 2), lse

    def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                 causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        dot, qt, kt, vt, ot = _to_bshd(dout, q, k, v, out)
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        private_backward(dot, qt, kt, vt, ot, lse.contiguous(), None, None, None, None, None, None,
                         dq, dk, dv, scale, causal)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    public_varlen = getattr(module, "flash_attn_varlen_func", None)
    varlen_fill = _none_for_required(public_varlen, (
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")) if public_varlen else {}

    def varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, scale: float, causal: bool) -> Tensor:
        return _first(public_varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                    max_seqlen_k=max_len, softmax_scale=scale, causal=causal, **varlen_fill))

    return FlashBinding("fa3", version, forward, backward, varlen if public_varlen else None)


def _installed_version(dist_names: tuple[str, ...], module: Any) -> tuple[int, ...]:
    from importlib import metadata

    text = getattr(module, "__version__", None)
    for name in dist_names:
        if text:
            break
        try:
            text = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return parse_version(text or "0")


@functools.lru_cache(maxsize=None)
def load_binding(name: str) -> Optional[FlashBinding]:
    """The binding of an installed package ("flash_attn" or "fa3"), detected once; None if absent.

    A present but unusable package (too old, import error) is logged and treated as absent.
    """
    module_name = {"flash_attn": "flash_attn", "fa3": "flash_attn_interface"}[name]
    if importlib.util.find_spec(module_name) is None:
        return None
    try:
        if name == "flash_attn":
            package = importlib.import_module("flash_attn")
            interface = importlib.import_module("flash_attn.flash_attn_interface")
            return bind_flash_attn2(interface, _installed_version(("flash-attn", "flash_attn"), package))
        interface = importlib.import_module("flash_attn_interface")
        return bind_fa3(interface, _installed_version(("flash-attn-3", "flash_attn_3"), interface))
    except Exception as exc:  # noqa: BLE001 - an optional accelerator; SDPA stays available
        logger.warning("attention backend %s unusable, ignored: %s", name, exc)
        return None
