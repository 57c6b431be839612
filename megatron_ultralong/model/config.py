"""`LlamaConfig`: the architecture of a Llama-family model, from an HF config.json or a preset.

This is the plugin's own description of the model; `model/gpt.py` turns it into Megatron-Core's
`TransformerConfig`, and `to_hf()` writes it back as a transformers `config.json` (RoPE scaling
included, so an exported extended model loads with its trained context).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Union

from megatron_ultralong.rope import RopeConfig, yarn_for_context_length

_LLAMA31_ROPE = RopeConfig(
    rope_type="llama3",
    theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (RMSNorm, SwiGLU, GQA, RoPE, no biases)."""

    vocab_size: int
    """Tokenizer vocabulary (unpadded); Megatron pads it for TP, exports truncate back."""

    hidden_size: int
    """Model width H."""

    num_layers: int
    """Number of transformer layers (HF num_hidden_layers)."""

    num_attention_heads: int
    """Query heads."""

    num_kv_heads: int
    """Key/value heads (GQA query groups; HF num_key_value_heads). Must divide the query heads."""

    head_dim: int
    """Per-head dimension d (HF head_dim, default hidden_size / num_attention_heads)."""

    ffn_hidden_size: int
    """SwiGLU inner size F (HF intermediate_size)."""

    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    tie_word_embeddings: bool = False
    """Output layer shares the embedding matrix (Llama 3.2 1B/3B)."""

    max_position_embeddings: int = 131072
    """Context length the model is configured for (after any extension)."""

    rope: RopeConfig = field(default_factory=RopeConfig)
    """RoPE base and scaling."""

    bos_token_id: Any = 128000
    """Carried through to the exported config.json."""

    eos_token_id: Any = 128001
    """Carried through to the exported config.json (an int or a list, as in Llama 3.1)."""

    pad_token_id: Any = None
    """Carried through to the exported config.json (None: the HF config has none, as in Llama 3.1)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                     "head_dim", "ffn_hidden_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}={value!r}: expected a positive integer")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim}: RoPE needs an even head dim")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps}: expected > 0")

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF mapping
    @classmethod
    def from_hf(cls, hf_config: Union[Mapping[str, Any], Any]) -> "LlamaConfig":
        """From a transformers `LlamaConfig` or a `config.json` dict. Raises ValueError naming the
        field for anything this model cannot represent."""
        d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in (None, "llama") or any(a != "LlamaForCausalLM" for a in archs):
            raise ValueError(
                f"model_type={model_type!r} architectures={archs!r}: only Llama "
                "(LlamaForCausalLM) checkpoints are supported"
            )
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size"):
            if d.get(key) is None:
                raise ValueError(f"config field {key!r} is missing")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r}: Llama uses 'silu' (SwiGLU)")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r}: biased Llama variants are not supported")
        if d.get("pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"pretraining_tp={d['pretraining_tp']!r}: only 1 is supported")
        heads = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        if heads % kv:
            raise ValueError(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            ffn_hidden_size=d["intermediate_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope=RopeConfig.from_hf(d),
            bos_token_id=d.get("bos_token_id", 128000),
            eos_token_id=d.get("eos_token_id", 128001),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf(self, torch_dtype: str = "bfloat16") -> dict:
        """A transformers `config.json` for LlamaForCausalLM, RoPE scaling written explicitly."""
        theta, scaling = self.rope.to_hf()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_hidden_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": theta,
            "rope_scaling": scaling,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
        }


def check_parallel_fits(cfg: LlamaConfig, tp: int, pp: int, tp_flag: str = "tensor_parallel=",
                        pp_flag: str = "pipeline_parallel=") -> None:
    """Refuse a TP/PP that cannot split this model: TP splits the heads (query and KV) and the
    SwiGLU columns, PP splits whole layers. The error names the flag as the caller spells it
    (`tp_flag="--tp "` gives "--tp 3 does not divide num_attention_heads=4")."""
    for name, value in (("num_attention_heads", cfg.num_attention_heads), ("num_kv_heads", cfg.num_kv_heads),
                        ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if value % tp:
            raise ValueError(f"{tp_flag}{tp} does not divide {name}={value}")
    if cfg.num_layers % pp:
        raise ValueError(f"{pp_flag}{pp} does not divide num_layers={cfg.num_layers}")


def extend_context(
    cfg: LlamaConfig, target: int, original: int = 8192, beta_fast: float = 32.0, beta_slow: float = 1.0,
) -> LlamaConfig:
    """`cfg` extended to a `target`-token context with YaRN (the UltraLong recipe's one formula).

    The RoPE becomes YaRN with factor = target / original, keeping the model's RoPE base, and
    max_position_embeddings becomes `target` exactly: transformers reads YaRN's
    `original_max_position_embeddings` as the pre-extension length and `max_position_embeddings` as
    the post-extension one, and warns when their ratio differs from `factor`
    (`_validate_yarn_parameters`). Used by the trainer, the convert CLI and both converters.
    """
    rope = yarn_for_context_length(
        target, theta=cfg.rope.theta, original_max_position_embeddings=original,
        beta_fast=beta_fast, beta_slow=beta_slow,
    )
    return cfg.replace(rope=rope, max_position_embeddings=target)


@dataclass(frozen=True)
class ContextExtension:
    """The arguments of `extend_context`, carried from a CLI or a config to the converters. The one
    spelling of the YaRN settings: the training config's `model.yarn: {target, original, beta_fast,
    beta_slow}` and mu-convert's `--yarn-target`, `--yarn-original`, `--yarn-beta-fast`, `--yarn-beta-slow`."""

    SCALAR_FIELD: ClassVar[str] = "target"
    """In a config, `yarn: 1048576` is short for `yarn: {target: 1048576}`."""

    target: int
    """Context length after extension (UltraLong: 1048576, 2097152, 4194304)."""

    original: int = 8192
    """YaRN's original length; factor = target / original (UltraLong: Llama 3's 8K, not 128K)."""

    beta_fast: float = 32.0
    """YaRN beta_fast (the paper's beta: 4; HF's default 32)."""

    beta_slow: float = 1.0
    """YaRN beta_slow (the paper's alpha: 1)."""

    def __post_init__(self) -> None:
        if not isinstance(self.target, int) or not isinstance(self.original, int) or self.original < 1:
            raise ValueError(f"yarn target={self.target!r}, original={self.original!r}: expected positive integers")
        if self.target <= self.original:
            raise ValueError(f"yarn target={self.target} must exceed original={self.original}")

    def apply(self, cfg: LlamaConfig) -> LlamaConfig:
        return extend_context(cfg, self.target, self.original, self.beta_fast, self.beta_slow)


PRESETS: dict[str, LlamaConfig] = {
    # A debug model that runs everywhere (CPU tests, the demo): GQA, untied, Llama-3 RoPE base.
    "tiny": LlamaConfig(
        vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
        head_dim=16, ffn_hidden_size=176, max_position_embeddings=8192,
        rope=RopeConfig(theta=500000.0),
    ),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32, num_kv_heads=8,
        head_dim=64, ffn_hidden_size=8192, tie_word_embeddings=True, max_position_embeddings=131072,
        rope=_LLAMA31_ROPE.replace(factor=32.0),
        eos_token_id=[128001, 128008, 128009],
    ),
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8,
        head_dim=128, ffn_hidden_size=14336, max_position_embeddings=131072, rope=_LLAMA31_ROPE,
        eos_token_id=[128001, 128008, 128009],
    ),
    "llama3.1-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64, num_kv_heads=8,
        head_dim=128, ffn_hidden_size=28672, max_position_embeddings=131072, rope=_LLAMA31_ROPE,
        eos_token_id=[128001, 128008, 128009],
    ),
}


def load_model_config(source: str) -> LlamaConfig:
    """A preset name, an HF `config.json` path, or a directory holding one."""
    if source in PRESETS:
        return PRESETS[source]
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path):
        raise ValueError(
            f"model {source!r}: not a preset ({', '.join(PRESETS)}) nor a config.json / HF directory"
        )
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    try:
        return LlamaConfig.from_hf(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
