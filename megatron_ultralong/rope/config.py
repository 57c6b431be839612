"""`RopeConfig`: the one typed object that carries RoPE settings, to and from HF `rope_scaling`.

Why a config of our own: megatron-core 0.16 reads YaRN settings through `getattr` on undeclared
`yarn_*` attributes of `TransformerConfig` (and applies its concentration factor whenever
`yarn_rotary_scaling_factor` merely exists: `_yarn_get_concentration_factor_from_config` in
megatron/core/models/common/embeddings/yarn_rotary_pos_embedding.py), its llama3
scaling hard-codes low/high factors and 8192, and it has no `attention_factor`. Here every field is
declared, validated, and converted to and from Hugging Face's `rope_scaling` dict losslessly.

Semantics follow transformers >= 4.56 (and 5.x): the explicit `factor` is used for YaRN, and the
correction range uses `original_max_position_embeddings`. (4.51-4.55 silently replaced factor by
max_position_embeddings / original; <= 4.50 used max_position_embeddings as the original length.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, get_args

RopeType = Literal["default", "linear", "llama3", "yarn"]
ROPE_TYPES: tuple[str, ...] = get_args(RopeType)

# Keys each rope type accepts in HF `rope_scaling` (besides rope_type / type), as in transformers'
# validators. `required` must be present; anything outside required | optional is rejected.
_HF_KEYS = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "llama3": (
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
        set(),
    ),
    "yarn": (
        {"factor"},
        {
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        },
    ),
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings, exactly as many as transformers' RoPE init functions read."""

    rope_type: RopeType = "default"
    """One of `RopeType`: "default", "linear", "llama3" or "yarn"."""

    theta: float = 10000.0
    """RoPE base (HF `rope_theta`); 500000 for Llama 3."""

    factor: Optional[float] = None
    """Scaling factor s (linear, llama3, yarn). UltraLong: s = target length / 8192."""

    original_max_position_embeddings: Optional[int] = None
    """Pre-extension context length (llama3, yarn). For yarn it sets the correction range."""

    low_freq_factor: Optional[float] = None
    """llama3 only: wavelengths above original / low_freq_factor are divided by `factor`."""

    high_freq_factor: Optional[float] = None
    """llama3 only: wavelengths below original / high_freq_factor are kept."""

    beta_fast: float = 32.0
    """yarn: rotation count bounding the kept high-frequency dims (YaRN's beta; paper: 4)."""

    beta_slow: float = 1.0
    """yarn: rotation count bounding the fully interpolated low-frequency dims (YaRN's alpha)."""

    attention_factor: Optional[float] = None
    """yarn: explicit attention factor; None derives it from factor (and mscale/mscale_all_dim)."""

    mscale: Optional[float] = None
    """yarn (DeepSeek style): numerator mscale; used only when both mscale and mscale_all_dim."""

    mscale_all_dim: Optional[float] = None
    """yarn (DeepSeek style): denominator mscale; used only when both are non-zero."""

    truncate: bool = True
    """yarn: floor/ceil the correction range to integers (HF `truncate`, default True)."""

    def __post_init__(self) -> None:
        _check(self.rope_type in ROPE_TYPES, "rope_type", self.rope_type, f"one of {ROPE_TYPES}")
        _check(self.theta > 0, "theta", self.theta, "> 0")
        t = self.rope_type
        if t in ("linear", "llama3", "yarn"):
            _check(self.factor is not None, "factor", self.factor, f"required for rope_type={t}")
            _check(self.factor >= 1.0, "factor", self.factor, ">= 1")
        if t in ("llama3", "yarn"):
            _check(
                self.original_max_position_embeddings is not None,
                "original_max_position_embeddings",
                None,
                f"required for rope_type={t}",
            )
            _check(
                self.original_max_position_embeddings > 0,
                "original_max_position_embeddings",
                self.original_max_position_embeddings,
                "> 0",
            )
        if t == "llama3":
            for name in ("low_freq_factor", "high_freq_factor"):
                _check(getattr(self, name) is not None, name, None, "required for rope_type=llama3")
            _check(
                self.high_freq_factor > self.low_freq_factor,
                "high_freq_factor",
                self.high_freq_factor,
                f"> low_freq_factor ({self.low_freq_factor})",
            )
        if t == "yarn":
            _check(
                self.beta_fast > self.beta_slow > 0,
                "beta_fast",
                self.beta_fast,
                f"> beta_slow ({self.beta_slow}) > 0",
            )
            if self.attention_factor is not None:
                _check(self.attention_factor > 0, "attention_factor", self.attention_factor, "> 0")

    # ---------------------------------------------------------------- HF mapping
    @classmethod
    def from_hf(cls, hf_config: Any) -> "RopeConfig":
        """Read `rope_theta` and `rope_scaling` (4.x) or `rope_parameters` (5.x) from an HF config.

        `hf_config` is a `PretrainedConfig` or a `config.json` dict. For yarn without
        `original_max_position_embeddings`, HF falls back to `max_position_embeddings`: resolved
        here, so the returned config is explicit.
        """
        get = hf_config.get if isinstance(hf_config, Mapping) else (
            lambda k, d=None: getattr(hf_config, k, d)
        )
        # transformers 5.x keeps everything in `rope_parameters`; 4.x uses `rope_scaling` + `rope_theta`.
        # When a file has both, 5.x lets `rope_scaling` win (convert_rope_params_to_dict): so do we.
        legacy, params = get("rope_scaling"), get("rope_parameters")
        scaling = dict(legacy) if legacy else (dict(params) if isinstance(params, Mapping) else {})
        theta = scaling.pop("rope_theta", None)
        theta = get("rope_theta") if theta is None else theta
        theta = 10000.0 if theta is None else float(theta)
        if not scaling:
            return cls(rope_type="default", theta=theta)
        scaling = dict(scaling)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
        scaling.pop("type", None)
        if rope_type is None:
            raise ValueError(f"rope_scaling={scaling!r}: missing field 'rope_type'")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={rope_type!r} is not supported; expected one of {ROPE_TYPES}"
            )
        required, optional = _HF_KEYS[rope_type]
        for key in sorted(required - scaling.keys()):
            raise ValueError(f"rope_scaling.{key} is required for rope_type={rope_type!r}")
        for key in sorted(scaling.keys() - required - optional):
            raise ValueError(
                f"rope_scaling.{key}={scaling[key]!r} is not a field of rope_type={rope_type!r}"
            )
        kw: dict = {"rope_type": rope_type, "theta": theta}
        if "factor" in scaling:
            kw["factor"] = float(scaling["factor"])
        if rope_type == "llama3":
            kw["low_freq_factor"] = float(scaling["low_freq_factor"])
            kw["high_freq_factor"] = float(scaling["high_freq_factor"])
            kw["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        if rope_type == "yarn":
            original = scaling.get("original_max_position_embeddings") or get("max_position_embeddings")
            kw["original_max_position_embeddings"] = None if original is None else int(original)
            # HF reads these with `or default`: 0 / None both mean the default.
            kw["beta_fast"] = float(scaling.get("beta_fast") or 32)
            kw["beta_slow"] = float(scaling.get("beta_slow") or 1)
            kw["truncate"] = bool(scaling.get("truncate", True))
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if scaling.get(key) is not None:
                    kw[key] = float(scaling[key])
        return cls(**kw)

    def to_hf(self) -> tuple[float, Optional[dict]]:
        """Return (`rope_theta`, `rope_scaling` or None) for an HF `config.json`.

        Only non-default optional yarn keys are written, so older transformers accept the dict.
        """
        t = self.rope_type
        if t == "default":
            return self.theta, None
        out: dict = {"rope_type": t, "factor": self.factor}
        if t == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        if t == "yarn":
            out.update(
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
            )
            if not self.truncate:
                out["truncate"] = False
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        return self.theta, out

    def replace(self, **changes: Any) -> "RopeConfig":
        return dataclasses.replace(self, **changes)


def yarn_for_context_length(
    target_length: int,
    *,
    theta: float = 500000.0,
    original_max_position_embeddings: int = 8192,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: Optional[float] = None,
) -> RopeConfig:
    """YaRN settings for a target context, as the UltraLong paper derives them.

    factor = target / original, with original = Llama 3's 8K pre-training length (not 128K):
    1M -> 128, 2M -> 256, 4M -> 512. The paper fixes YaRN's alpha = 1, beta = 4, i.e.
    beta_slow = 1, beta_fast = 4 (arXiv 2504.06214 §3); the released config.json files are not
    public, so whether they carry beta_fast = 4 is unknown: it is an argument, defaulting to HF's 32.
    """
    if target_length <= original_max_position_embeddings:
        raise ValueError(
            f"target_length={target_length} must exceed "
            f"original_max_position_embeddings={original_max_position_embeddings}"
        )
    factor = target_length / original_max_position_embeddings
    if not math.isfinite(factor):
        raise ValueError(f"target_length={target_length}: factor is not finite")
    return RopeConfig(
        rope_type="yarn",
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=original_max_position_embeddings,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        attention_factor=attention_factor,
    )


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"RopeConfig.{field}={value!r}: expected {expected}")
