"""Checkpoint paths as users give them, resolved once for every tool (training, conversion, eval).

A training run writes `<save>/iter_XXXXXXX/model/` (checkpoint/train_state.py) and a `latest`
pointer; `mu-convert hf-to-mcore` writes a bare model directory. Every consumer accepts any of:

    <save>                 a training save directory: the checkpoint `latest` names
    <save>/iter_0000480    one training checkpoint: its model/ subdirectory
    <save>/iter_0000480/model, or a converted model directory: itself

Nothing read from a checkpoint may lead out of it: `latest` must hold a plain `iter_XXXXXXX` name,
and the iteration it names, the `model/` inside it and every entry of the model directory must be
real files and directories, not symbolic links (a link in a shared directory could point a job at
another user's files, e.g. to copy them into an export). The path the user typed may itself be a
link: it is resolved once, and everything inside is checked from there.

Nothing here imports torch or megatron-core at module level, so CLIs can check paths (and
`mu-train --dry-run` can read a checkpoint's architecture) before any heavy import.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

LATEST = "latest"
"""The pointer file in a training save directory (its content: `iter_XXXXXXX`)."""
MODEL_SUBDIR = "model"
STATE = "trainer_state.json"
"""A training checkpoint's own state file; written last, so its presence marks a complete save."""
ITER_NAME = re.compile(r"^iter_(\d{7})$")
"""The only names `latest` may hold and retention or resume may touch."""
_DIST_METADATA = "metadata.json"


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and (p / _DIST_METADATA).is_file()


def inside(path: Path, root: Path) -> bool:
    """`path` is no symbolic link and stays under `root` once every link above it is resolved."""
    return not path.is_symlink() and path.resolve().is_relative_to(root.resolve())


def pointer_target(save_dir: Union[str, os.PathLike], require_complete: bool = True) -> tuple[Optional[Path], str]:
    """The iteration `save_dir/latest` names, or (None, why not). Only a plain iter_XXXXXXX name
    inside save_dir that is a real directory (no link); require_complete: with its trainer_state.json."""
    root = Path(save_dir)
    pointer = root / LATEST
    if pointer.is_symlink() or not pointer.is_file():
        return None, f"{pointer} does not exist" if not pointer.is_symlink() else f"{pointer} is a symbolic link"
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not ITER_NAME.match(name):
        return None, f"{pointer} names {name!r}, not an iter_XXXXXXX directory of {root}"
    target = root / name
    if not inside(target, root):
        return None, f"{pointer} names {name}, which leads outside {root} (a symbolic link)"
    if not target.is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    if require_complete and not (target / STATE).is_file():
        return None, f"{pointer} names {name}, which is incomplete (no {STATE})"
    return target, ""


def _no_links_inside(model: Path, flag: str, given: str) -> Path:
    """Refuse a model directory holding a symbolic link (see the module doc); returns `model`."""
    for entry in sorted(model.rglob("*")):
        if entry.is_symlink():
            raise ValueError(f"{flag}={given!r}: {entry} is a symbolic link; a checkpoint holds real files only "
                             "(copy the file in, or convert from the checkpoint it points to)")
    return model


def resolve_megatron_checkpoint(path: Union[str, os.PathLike], flag: str = "--model") -> Optional[Path]:
    """The torch_dist model directory for `path`, or None when `path` exists but is no Megatron
    checkpoint (e.g. an HF directory). ValueError (naming `flag`) when it does not exist, when a
    `latest` pointer names a checkpoint that is absent, outside, or has no model/, or when anything
    inside the checkpoint is a symbolic link."""
    given = str(path)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag}={given!r}: no such file or directory")
    p = p.resolve()  # the user's own path may be a link; nothing below it may be
    if _is_model_dir(p):
        return _no_links_inside(p, flag, given)
    sub = p / MODEL_SUBDIR
    if sub.is_symlink():
        raise ValueError(f"{flag}={given!r}: {sub} is a symbolic link; a checkpoint holds real files only")
    if _is_model_dir(sub):
        return _no_links_inside(sub, flag, given)
    if (p / LATEST).exists() or (p / LATEST).is_symlink():
        target, why = pointer_target(p, require_complete=False)
        if target is None:
            raise ValueError(f"{flag}={given!r}: {why}")
        model = target / MODEL_SUBDIR
        if model.is_symlink():
            raise ValueError(f"{flag}={given!r}: {model} is a symbolic link; a checkpoint holds real files only")
        if not _is_model_dir(model):
            raise ValueError(f"{flag}={given!r}: {p / LATEST} names {target.name!r}, which has no complete "
                             f"{MODEL_SUBDIR}/")
        return _no_links_inside(model, flag, given)
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


def checkpoint_model_config(path: Union[str, os.PathLike], flag: str = "model.megatron_checkpoint"):
    """The `LlamaConfig` (RoPE included) a Megatron checkpoint was saved with; `path` as above.
    Read through checkpoint/info.py, the one reader of the plugin's checkpoint metadata."""
    from megatron_ultralong.checkpoint.info import read_checkpoint_info

    return read_checkpoint_info(require_megatron_checkpoint(path, flag)).model_config
