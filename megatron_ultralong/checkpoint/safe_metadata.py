"""Read a torch.distributed.checkpoint `.metadata` file without letting it run code, exactly once.

torch's `FileSystemReader.read_metadata` reads `.metadata` with a plain `pickle.load` (torch 2.13,
torch/distributed/checkpoint/filesystem.py), so anyone who can write into a checkpoint directory
could run code in every process that loads it. Here the file is read once into memory and
unpickled with the globals restricted (Python's documented "restricting globals" recipe,
https://docs.python.org/3/library/pickle.html#restricting-globals) to an exact list of
(module, qualified name) pairs: the types torch's writer emits. A dotted name (pickle protocol 4
resolves `os.system` as an attribute path through any allowed module) or any other attribute of an
allowed module is not in that list, so it is refused before it is looked up.

The result is then checked for shape (a `Metadata` whose storage entries name plain files of the
checkpoint directory: a `relative_path` of `../x` would make torch read another file as tensor
data), and `VettedFileSystemReader` hands that very object to torch's reader: the bytes that were
vetted are the bytes that load; a file swapped after the check is never unpickled.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from megatron_ultralong.checkpoint.manifest import CheckpointCorruptError

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {(_DCP, name) for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                               "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
                               "_MEM_FORMAT_ENCODING")}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # maps a layout's name to the layout (torch.strided...)
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
    }
    # dtypes are pickled by name (`torch.float32`): exactly the dtype attributes torch has.
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)
"""Every global a DCP `.metadata` may name: exact pairs, nothing else from those modules."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise CheckpointCorruptError(
                f"{self.source}: refuses to unpickle {module}.{name}, which is not a type a checkpoint's "
                "metadata holds (a file that could run code on load)"
            )
        return super().find_class(module, name)


def _check_shape(md: Any, path: Path) -> Metadata:
    """The unpickled object is a DCP Metadata whose every storage file is a plain file name."""
    if not isinstance(md, Metadata):
        raise CheckpointCorruptError(f"{path}: holds a {type(md).__name__}, not torch DCP Metadata")
    if not isinstance(md.state_dict_metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
            for k, v in md.state_dict_metadata.items()):
        raise CheckpointCorruptError(f"{path}: state_dict_metadata is not a table of tensor/bytes entries")
    if md.storage_meta is not None and not isinstance(md.storage_meta, StorageMeta):
        raise CheckpointCorruptError(f"{path}: storage_meta is a {type(md.storage_meta).__name__}")
    if not isinstance(md.storage_data, dict):
        raise CheckpointCorruptError(f"{path}: storage_data is a {type(md.storage_data).__name__}, not a table")
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointCorruptError(f"{path}: storage_data holds a {type(info).__name__} entry")
        rel = info.relative_path
        if not isinstance(rel, str) or PurePosixPath(rel).name != rel or rel in ("", ".", "..") or "\\" in rel:
            raise CheckpointCorruptError(
                f"{path}: a storage entry names {rel!r}, not a file of {path.parent} (a path out of the checkpoint)"
            )
        if (path.parent / rel).is_symlink():
            raise CheckpointCorruptError(f"{path}: storage file {path.parent / rel} is a symbolic link")
    return md


def read_dcp_metadata(directory: str | Path) -> Metadata:
    """The vetted `Metadata` of `directory/.metadata` (read once). CheckpointCorruptError names the
    file and the refused global, or what else is wrong with it."""
    path = Path(directory) / METADATA
    if path.is_symlink():
        raise CheckpointCorruptError(f"{path} is a symbolic link; a checkpoint holds real files only")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing: not a complete torch_dist checkpoint") from None
    try:
        md = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except CheckpointCorruptError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickle
        raise CheckpointCorruptError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
    return _check_shape(md, path)


def check_dcp_metadata(directory: str | Path) -> None:
    """Raise CheckpointCorruptError unless `directory/.metadata` passes `read_dcp_metadata`."""
    read_dcp_metadata(directory)


class VettedFileSystemReader(FileSystemReader):
    """torch's FileSystemReader whose metadata is the object `read_dcp_metadata` vetted: torch never
    unpickles `.metadata` itself. Everything else (the tensor reads) is torch's own."""

    def __init__(self, path: str | Path, metadata: Metadata):
        super().__init__(str(path))
        self._vetted = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = self._vetted
        if getattr(md, "storage_meta", None) is None:  # as torch's read_metadata does
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
