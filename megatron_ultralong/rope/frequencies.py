"""The one home of the RoPE frequency math: inverse frequencies and the attention factor.

Each function reproduces transformers' `modeling_rope_utils._compute_*_parameters` operation by
operation, in float32, so the result is bit-identical to HF (tests/test_rope_frequencies.py
compares against transformers' own functions). Do not "simplify" an expression here: a reordered
product changes the last bit, and at position 4M a last-bit change in inv_freq moves the angle.

Notation (YaRN, arXiv 2309.00071; transformers' modeling_rope_utils.py): d = rotary dim, b = theta, i = 0 .. d/2-1, L0 = original context length.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from megatron_ultralong.rope.config import RopeConfig


def _default(rope: RopeConfig, dim: int, device: Optional[torch.device]) -> tuple[torch.Tensor, float]:
    """theta_i = 1 / b^(2i/d); exponent from an int64 arange converted to fp32, as HF does."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (rope.theta ** exponent), 1.0


def _linear(rope: RopeConfig, dim: int, device: Optional[torch.device]) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency divided by the factor."""
    inv_freq, attention_factor = _default(rope, dim, device)
    inv_freq /= rope.factor
    return inv_freq, attention_factor


def _llama3(rope: RopeConfig, dim: int, device: Optional[torch.device]) -> tuple[torch.Tensor, float]:
    """Llama 3.1: keep short wavelengths, divide long ones by factor, blend in between."""
    inv_freq, attention_factor = _default(rope, dim, device)
    factor = rope.factor
    low_freq_factor = rope.low_freq_factor
    high_freq_factor = rope.high_freq_factor
    old_context_len = rope.original_max_position_embeddings

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq_llama, attention_factor


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(rope: RopeConfig) -> float:
    """HF's rule: explicit attention_factor, else mscale ratio if both are truthy, else get_mscale(s)."""
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return float(yarn_get_mscale(rope.factor, rope.mscale) / yarn_get_mscale(rope.factor, rope.mscale_all_dim))
    return yarn_get_mscale(rope.factor)


def yarn_correction_range(rope: RopeConfig, dim: int) -> tuple[float, float]:
    """Pair indices (low, high) bounding the YaRN ramp: D(r) = d ln(L0 / (2 pi r)) / (2 ln b)."""

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low = correction_dim(rope.beta_fast)
    high = correction_dim(rope.beta_slow)
    if rope.truncate:
        low = math.floor(low)
        high = math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(rope: RopeConfig, dim: int, device: Optional[torch.device]) -> tuple[torch.Tensor, float]:
    """YaRN: blend extrapolated (original) and interpolated (divided by s) frequencies per pair."""
    factor = rope.factor
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)

    low, high = yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001  # HF: prevent a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    inv_freq_extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = (
        inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
        + inv_freq_extrapolation * inv_freq_extrapolation_factor
    )
    return inv_freq, yarn_attention_factor(rope)


_INIT_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


def compute_rope_parameters(
    rope: RopeConfig, dim: int, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [dim/2] fp32, attention_factor) for `rope` and rotary dim `dim`.

    attention_factor multiplies both cos and sin in HF, i.e. scales q.k logits by its square.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim={dim}: expected a positive even number")
    return _INIT_FUNCTIONS[rope.rope_type](rope, dim, device)
