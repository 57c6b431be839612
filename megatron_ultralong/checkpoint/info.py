"""The plugin's metadata next to a `torch_dist` model: `ultralong_checkpoint.json`, read in one place.

Every reader (the loader, the converters, the evaluators, the dry run, resume's model check) gets
a `CheckpointInfo` from `read_checkpoint_info`, which checks the format version and names the file
and the field on any error. The file is JSON: nothing in it can run code.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_ultralong.dtypes import DtypeName, parse_dtype
from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.model.gpt import DEFAULT_VOCAB_DIVISIBLE_BY
from megatron_ultralong.rope import RopeConfig

INFO_FILE = "ultralong_checkpoint.json"
FORMAT_VERSION = 1
_DIST_METADATA = "metadata.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """What `ultralong_checkpoint.json` records next to the tensors."""

    model_config: LlamaConfig
    """Architecture (incl. RoPE) the weights belong to."""

    params_dtype: DtypeName = "float32"
    """dtype of the saved weights: "float32", "bfloat16" or "float16"."""

    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY
    """Vocab padding rule used by the model that saved (padded = multiple of this x TP)."""

    extra: dict = field(default_factory=dict)
    """Caller's JSON-serialisable extras (iteration, tokens seen, source checkpoint...)."""

    @property
    def torch_dtype(self):
        return parse_dtype(self.params_dtype, f"{INFO_FILE} params_dtype")

    def to_json(self) -> dict:
        cfg = asdict(self.model_config)
        cfg["rope"] = asdict(self.model_config.rope)
        return {
            "format_version": FORMAT_VERSION,
            "model_config": cfg,
            "params_dtype": self.params_dtype,
            "vocab_divisible_by": self.vocab_divisible_by,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict, source: str = INFO_FILE) -> "CheckpointInfo":
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            got = d.get("format_version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{source}: format_version={got!r}, expected {FORMAT_VERSION}")
        try:
            cfg = dict(d["model_config"])
            cfg["rope"] = RopeConfig(**cfg["rope"])
            return cls(
                model_config=LlamaConfig(**cfg),
                params_dtype=d["params_dtype"],
                vocab_divisible_by=int(d["vocab_divisible_by"]),
                extra=dict(d.get("extra") or {}),
            )
        except KeyError as e:
            raise ValueError(f"{source}: field {e.args[0]!r} is missing") from None
        except TypeError as e:  # an unknown or mistyped field of LlamaConfig / RopeConfig
            raise ValueError(f"{source}: {e}") from None


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """The plugin metadata of a model directory written by `save_megatron_checkpoint`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint {path} does not exist")
    if not (path / _DIST_METADATA).is_file():
        raise ValueError(f"{path}: no {_DIST_METADATA}, not a megatron-core distributed checkpoint")
    info_path = path / INFO_FILE
    if not info_path.is_file():
        raise ValueError(f"{path}: no {INFO_FILE}; was it written by megatron-ultralong?")
    try:
        body = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return CheckpointInfo.from_json(body, str(info_path))


def model_config_differences(saved: LlamaConfig, current: LlamaConfig) -> list[str]:
    """`field: saved X, now Y` for every field of the architecture and its RoPE that differs."""
    a, b = asdict(saved), asdict(current)
    out = []
    for key in a:
        if key == "rope":
            out += [f"rope.{k}: {a['rope'][k]!r} vs {b['rope'].get(k)!r}" for k in a["rope"]
                    if a["rope"][k] != b["rope"].get(k)]
        elif a[key] != b.get(key):
            out.append(f"{key}: {a[key]!r} vs {b.get(key)!r}")
    return out
