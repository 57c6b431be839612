"""Write HF safetensors shards tensor by tensor, without holding a shard in memory.

Why not `safetensors.torch.save_file`: it takes a whole shard as a dict of tensors and serialises it
into one `bytes` object before writing, so exporting a 1 GB shard holds the shard's tensors plus a
second, serialised copy (measured: the largest part of the exporter's peak RSS before this
writer). A safetensors file is an 8-byte little-endian header length, a JSON header giving every
tensor's dtype, shape and byte range, then the raw bytes. The exporter knows every tensor's name,
shape and dtype before it reads any weight, so the headers can be planned up front and each tensor
written into its byte range as soon as it exists, then dropped.

    writer = HFShardWriter(out_dir, [(name, dtype, shape), ...], max_shard_bytes="1GB")
    writer.add(name, tensor)      # any order; written straight to disk
    writer.close()                # raises if a planned tensor was never written
    finish_hf_shards(out_dir, writer.shards, writer.total_bytes)   # HF names + index

The files are read back by safetensors' own `safe_open` and by transformers in the tests.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from megatron_ultralong.convert.hf_io import INDEX_FILE, SINGLE_FILE, ST_DTYPES, parse_size

_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
_HEADER_ALIGN = 8
"""safetensors pads the JSON header with spaces so the tensor bytes start 8-byte aligned."""


class HFShardWriter:
    """Safetensors shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its
    own), planned from `tensors` = [(name, dtype, shape)] in the order given.

    Each shard is a temporary `<prefix>part-0000k.safetensors.tmp` in out_dir, created (header
    written, file sized) when its first tensor arrives; a tensor is written at its planned offset
    by `add`, and the shard's file is closed once all its tensors are in. `finish_hf_shards` gives
    the shards HF's names. Not thread-safe.
    """

    def __init__(self, out_dir: Union[str, os.PathLike], tensors: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 max_shard_bytes: Union[int, str] = "1GB", prefix: str = ""):
        self.out_dir = Path(out_dir)
        limit = parse_size(max_shard_bytes)
        self._where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        """name -> (shard index, byte offset in the shard's data section, dtype, shape)."""
        plans: list[dict[str, dict]] = []
        used = 0
        for name, dtype, shape in tensors:
            if name in self._where:
                raise ValueError(f"tensor {name!r} planned twice")
            if dtype not in _ST_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors equivalent")
            shape = tuple(int(s) for s in shape)
            nbytes = _nbytes(dtype, shape)
            if not plans or (plans[-1] and used + nbytes > limit):
                plans.append({})
                used = 0
            if used % torch.empty((), dtype=dtype).element_size():
                # safetensors' own writer sorts by alignment; we keep the caller's order instead.
                raise ValueError(f"tensor {name!r} ({dtype}) would start at misaligned byte {used} of its "
                                 "shard: plan larger dtypes first")
            plans[-1][name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [used, used + nbytes]}
            self._where[name] = (len(plans) - 1, used, dtype, shape)
            used += nbytes
        self.shards: list[tuple[str, list[str]]] = [
            (f"{prefix}part-{k:05d}.safetensors.tmp", list(plan)) for k, plan in enumerate(plans)
        ]
        """(temporary file name, tensor names) of every shard, in order."""
        self._data_bytes = [max((p["data_offsets"][1] for p in plan.values()), default=0) for plan in plans]
        self.total_bytes = sum(self._data_bytes)
        self._headers = [_header(plan) for plan in plans]
        self._pending = [set(plan) for plan in plans]
        self._fds: dict[int, int] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        """Write `tensor` (CPU; its planned dtype and shape) into its shard."""
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not part of this export's plan")
        shard, offset, dtype, shape = self._where[name]
        if name not in self._pending[shard]:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = self._open(shard)
        data = tensor.detach().contiguous()
        _pwrite_all(fd, _bytes_view(data), len(self._headers[shard]) + offset)
        self._pending[shard].discard(name)
        if not self._pending[shard]:
            os.close(self._fds.pop(shard))

    def close(self) -> None:
        """Close every file; raise if a planned tensor was never written (the shards are incomplete)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        missing = [n for pending in self._pending for n in sorted(pending)]
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, first {missing[0]!r}")

    def _open(self, shard: int) -> int:
        path = self.out_dir / self.shards[shard][0]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        header = self._headers[shard]
        _pwrite_all(fd, memoryview(header), 0)
        os.ftruncate(fd, len(header) + self._data_bytes[shard])  # full size up front; tensors fill their ranges
        return fd


def _header(plan: dict[str, dict]) -> bytes:
    """8-byte little-endian length + the JSON header, space-padded to the alignment."""
    body = json.dumps({"__metadata__": {"format": "pt"}, **plan}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % _HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _bytes_view(t: Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor `t`, without a copy (valid while `t` lives).

    Not `t.numpy()`: torch marks a storage shared with numpy as not resizable, and the exporter
    frees each written layer with `untyped_storage().resize_(0)`."""
    if t.device.type != "cpu":
        raise ValueError(f"tensor on {t.device}: the shard writer takes CPU tensors")
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B") if nbytes else memoryview(b"")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite may write less than asked (Linux caps one call near 2 GiB): loop."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def finish_hf_shards(out_dir: Union[str, os.PathLike], shards: list[tuple[str, list[str]]],
                     total_bytes: int) -> dict[str, str]:
    """Rename temporary shards (from one or several writers, in order) to HF's names and write the
    index (or a single `model.safetensors`). Returns the weight map."""
    out_dir = Path(out_dir)
    if len(shards) == 1:
        os.replace(out_dir / shards[0][0], out_dir / SINGLE_FILE)
        return {n: SINGLE_FILE for n in shards[0][1]}
    weight_map: dict[str, str] = {}
    for k, (tmp, names) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out_dir / tmp, out_dir / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    with open(out_dir / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return weight_map
