"""Checkpoint paths as users give them, resolved once for every tool (training, conversion, eval).

A training run writes `<save>/iter_XXXXXXX/model/` (checkpoint/train_state.py) and a `latest`
pointer; `mu-convert hf-to-mcore` writes a bare model directory. Every consumer accepts any of:

    <save>                 a training save directory: the checkpoint `latest` names
    <save>/iter_0000480    one training checkpoint: its model/ subdirectory
    <save>/iter_0000480/model, or a converted model directory: itself

Nothing here imports torch or megatron-core, so CLIs can check paths (and `mu-train --dry-run` can
read a checkpoint's architecture) before any heavy import.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

LATEST = "latest"
"""The pointer file in a training save directory (its content: `iter_XXXXXXX`)."""
MODEL_SUBDIR = "model"
INFO_FILE = "ultralong_checkpoint.json"
"""The plugin's metadata next to a torch_dist model (written by checkpoint/torch_dist.py)."""
_DIST_METADATA = "metadata.json"


def _is_model_dir(p: Path) -> bool:
    return (p / _DIST_METADATA).is_file()


def resolve_megatron_checkpoint(path: Union[str, os.PathLike], flag: str = "--model") -> Optional[Path]:
    """The torch_dist model directory for `path`, or None when `path` exists but is no Megatron
    checkpoint (e.g. an HF directory). ValueError (naming `flag`) when it does not exist, or when a
    `latest` pointer names a checkpoint that is absent or has no model/."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag}={str(path)!r}: no such file or directory")
    for candidate in (p, p / MODEL_SUBDIR):
        if _is_model_dir(candidate):
            return candidate
    pointer = p / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        model = p / name / MODEL_SUBDIR
        if not name or not _is_model_dir(model):
            raise ValueError(f"{flag}={str(path)!r}: {pointer} names {name!r}, which has no complete {MODEL_SUBDIR}/")
        return model
    return None


def require_megatron_checkpoint(path: Union[str, os.PathLike], flag: str = "--model") -> Path:
    """Like `resolve_megatron_checkpoint`, but a directory that is no Megatron checkpoint is an error."""
    model = resolve_megatron_checkpoint(path, flag)
    if model is None:
        raise ValueError(
            f"{flag}={str(path)!r}: not a Megatron checkpoint (expected a model directory with "
            f"{_DIST_METADATA}, a training iter_* directory with {MODEL_SUBDIR}/, or a save directory with {LATEST})"
        )
    return model


def read_info_json(model_dir: Union[str, os.PathLike]) -> dict:
    """The raw `ultralong_checkpoint.json` of a resolved model directory."""
    info = Path(model_dir) / INFO_FILE
    if not info.is_file():
        raise ValueError(f"{model_dir}: no {INFO_FILE}; was it written by megatron-ultralong?")
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{info}: invalid JSON at line {e.lineno}: {e.msg}") from None


def checkpoint_model_config(path: Union[str, os.PathLike], flag: str = "model.megatron_checkpoint"):
    """The `LlamaConfig` (RoPE included) a Megatron checkpoint was saved with; `path` as above."""
    from megatron_ultralong.model.config import LlamaConfig
    from megatron_ultralong.rope import RopeConfig

    d = read_info_json(require_megatron_checkpoint(path, flag))
    cfg = dict(d["model_config"])
    cfg["rope"] = RopeConfig(**cfg["rope"])
    return LlamaConfig(**cfg)
