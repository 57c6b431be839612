"""Per-file checksum manifest of a checkpoint directory: written at save, verified at load.

A training checkpoint is many files written by many ranks (megatron's `__<rank>_<i>.distcp`,
`common.pt`, `.metadata`, the optimizer and RNG files, `trainer_state.json`). A byte flipped on a
disk or a file truncated by a full quota loads silently (the weights just change), so the save
records each file's size and CRC-32 in `manifest.json` and the load recomputes them first, naming
the file that differs.

Hash: `zlib.crc32`, streamed in 8 MiB blocks. The threat is storage corruption, not an attacker
(whoever can rewrite a file can rewrite the manifest too; what keeps a hostile file from running
code is that nothing is unpickled outside an allowlist: docs/security.md), and CRC-32 is several times faster than a cryptographic hash (docs/benchmarks.md, "checkpoint manifest
hash"). The work is shared: rank r hashes files r, r + world, ... (largest first) and rank 0 gathers,
so a 100 GB optimizer checkpoint costs each of 64 ranks ~1.6 GB of reading. Each rank also fsyncs the
files it hashes, so a checkpoint that `latest` names is on disk, not in a page cache (on a network file
system an fsync flushes only the calling client's cache: there every writer's data is already
committed by torch's writer closing its files).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional

import torch.distributed as dist

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_BLOCK = 8 << 20


class CheckpointCorruptError(ValueError):
    """A file of a checkpoint is missing, truncated or differs from its manifest entry."""


def file_crc32(path: Path, fsync: bool = False) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in 8 MiB blocks; optionally fsync it too."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
        if fsync:
            os.fsync(f.fileno())
    return size, crc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry inside `path` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[str]:
    """Every file under root, relative, POSIX separators, largest first (balances the ranks)."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            if name != MANIFEST:
                found.append((full.lstat().st_size, full.relative_to(root).as_posix()))
    return [rel for _, rel in sorted(found, key=lambda t: (-t[0], t[1]))]


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(local: dict) -> dict:
    """Union of every rank's dict (every rank gets it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def write_manifest(root: Path) -> dict:
    """Collective, after every rank finished writing into `root`: hash (and fsync) every file,
    rank 0 writes `root/manifest.json` and fsyncs every directory of the tree. Returns the entries."""
    root = Path(root)
    rank, world = _world()
    files = _files(root)  # the same list on every rank: the writers are done
    local = {}
    for rel in files[rank::world]:
        size, crc = file_crc32(root / rel, fsync=True)
        local[rel] = {"size": size, "crc32": crc}
    entries = _gather(local)
    if rank == 0:
        body = {"version": MANIFEST_VERSION, "hash": "crc32", "files": dict(sorted(entries.items()))}
        write_file_durably(root / MANIFEST, json.dumps(body, indent=1) + "\n")
        for dirpath, _, _ in os.walk(root):
            fsync_dir(Path(dirpath))
    return entries


def read_manifest(root: Path) -> Optional[dict]:
    """The manifest's file table, or None for a checkpoint saved before manifests existed."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if body.get("hash") != "crc32" or not isinstance(files, dict):
            raise ValueError(f"unsupported hash {body.get('hash')!r}")
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointCorruptError(f"{path}: unreadable checksum manifest ({e})") from e
    return files


def verify_manifest(root: Path, only: str = "") -> Optional[str]:
    """Collective: recompute every file's size and CRC-32 (shared over the ranks).

    Returns None when every file matches its manifest entry, else one line naming the first bad
    file (the same line on every rank). A file present but not listed is bad too (a file planted
    after the save, e.g. a `.distcp` a rewritten `.metadata` points to). only: check just the
    entries and files under this relative prefix (e.g. "model/": what a weights-only load reads).
    A checkpoint without a manifest (saved before they existed) also returns None: the caller says
    it loads unverified. An unreadable manifest raises CheckpointCorruptError."""
    root = Path(root)
    files = read_manifest(root)
    if files is None:
        return None
    files = {rel: entry for rel, entry in files.items() if rel.startswith(only)}
    rank, world = _world()
    try:
        names = sorted(files, key=lambda rel: (-int(files[rel]["size"]), rel))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorruptError(f"{root / MANIFEST}: malformed entry ({e})") from e
    problems = {}
    if rank == 0:
        scope = root / only if only else root
        for rel in sorted(set(_files(scope)) - {r[len(only):] for r in files}):
            problems[only + rel] = f"{scope / rel} is not listed in {root / MANIFEST} (added after the save)"
    for rel in names[rank::world]:
        want = files[rel]
        path = root / rel
        if not path.is_file():
            problems[rel] = f"{path} is missing (listed in {root / MANIFEST})"
            continue
        size, crc = file_crc32(path)
        if size != want["size"]:
            problems[rel] = f"{path} is truncated or grown: {size} bytes, the manifest says {want['size']}"
        elif crc != want["crc32"]:
            problems[rel] = f"{path} is corrupt: CRC-32 {crc:#010x}, the manifest says {want['crc32']:#010x}"
    problems = _gather(problems)
    if not problems:
        return None
    first = sorted(problems)[0]
    more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
    return problems[first] + more


def write_file_durably(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file, fsync, rename, fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
