"""Block kernels from the flash-attn packages (FlashAttention-2 and -3), bound once per process.

Why not the private functions by keyword: flash-attn >= 2.7 registers `_flash_attn_forward` /
`_flash_attn_backward` as `torch.library.custom_op`s, whose `inspect.signature` is
`(*args, **kwargs)`, and flash-attn <= 2.6.3 returns `(out, q, k, v, out_padded, softmax_lse, ...)`
from the forward, so no single keyword/position rule fits both. Instead:

- forward: the PUBLIC `flash_attn_func(q, k, v, softmax_scale=, causal=, return_attn_probs=True)`,
  which returns `(out, softmax_lse, S_dmask)` in every 2.x release
  (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py); FA3's
  `flash_attn_interface.flash_attn_func` (hopper/) returns `(out, softmax_lse)`.
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

    return FlashBinding("flash_attn", version, forward, backward)


def bind_fa3(module: Any, version: tuple[int, ...]) -> FlashBinding:
    """Bind FlashAttention-3 (`module` is `flash_attn_interface` from flash-attention's hopper/)."""
    public_forward, private_backward = module.flash_attn_func, module._flash_attn_backward

    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
        qt, kt, vt = _to_bshd(q, k, v)
        res = public_forward(qt, kt, vt, softmax_scale=scale, causal=causal, return_attn_probs=True)
        if not isinstance(res, (tuple, list)) or len(res) < 2:
            raise RuntimeError("flash_attn_interface.flash_attn_func did not return (out, softmax_lse)")
        return res[0].transpose(1, 2), res[1]

    def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                 causal: bool) -> tuple[Tensor, Tensor, Tensor]:
        dot, qt, kt, vt, ot = _to_bshd(dout, q, k, v, out)
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        private_backward(dot, qt, kt, vt, ot, lse.contiguous(), None, None, None, None, None, None,
                         dq, dk, dv, scale, causal)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    return FlashBinding("fa3", version, forward, backward)


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
