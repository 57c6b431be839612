"""Refuse a torch.distributed.checkpoint `.metadata` file that would run code when unpickled.

torch's `FileSystemReader.read_metadata` reads `.metadata` with a plain `pickle.load` (torch 2.13,
torch/distributed/checkpoint/filesystem.py), so anyone who can write into a checkpoint directory
could run code in every rank of the next resume. megatron-core loads it through that reader. Before
handing a directory to megatron, the file is unpickled once here with the globals restricted to the
types a DCP metadata file holds (Python's documented "restricting globals" recipe); anything else is
refused, naming the file and the global. The allowlist is what torch's writer emits: the dataclasses
of `torch.distributed.checkpoint.metadata`, the filesystem writer's `_StorageInfo`, `torch.Size`,
dtypes and layouts, and paths.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from megatron_ultralong.checkpoint.manifest import CheckpointCorruptError

METADATA = ".metadata"
_ANY_NAME_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = module in _ANY_NAME_MODULES or (module, name) in _ALLOWED
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise CheckpointCorruptError(
                f"{self.source}: refuses to unpickle {module}.{name}, which is not a type a checkpoint's "
                "metadata holds (a file that could run code on load)"
            )
        return super().find_class(module, name)


def check_dcp_metadata(directory: str | Path) -> None:
    """Raise CheckpointCorruptError if `directory/.metadata` exists and holds any global outside the
    allowlist (or is not a pickle at all). A directory without one is left to its loader."""
    path = Path(directory) / METADATA
    if not path.is_file():
        return
    try:
        _RestrictedUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except CheckpointCorruptError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickle
        raise CheckpointCorruptError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
