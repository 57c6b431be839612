"""Writing Megatron .bin/.idx with bounded memory, and atomic outputs.

`CompactIndexedDatasetBuilder` writes exactly the bytes of megatron-core's `IndexedDatasetBuilder`
+ `_IndexWriter` (core 0.16: header `MMIDIDX\\0\\0`, version 1, dtype code, sequence and document
counts, int32 lengths, int64 byte pointers, int64 document indices; tested byte for byte against
megatron-core's builder, and read back with megatron-core's `IndexedDataset`). It is written here,
not imported, for one reason: `import megatron.core.datasets.indexed_dataset` runs
`megatron/core/__init__.py`, which imports torch and most of the library, ~10 s of CPU per build
process, most of the fixed cost that kept a 20 MB build from gaining over preprocess_data.py. Its
bookkeeping is typed arrays (12 bytes per document instead of ~70 for Python lists; the Python
list is what ran out of memory at finalize in bigcode-project/Megatron-LM#34) with numpy pointers.

`AtomicOutputs` writes every output under a hidden temporary name in the target directory and
renames when the build is complete: the .idx, which is what makes a prefix loadable, is removed
first (when overwriting) and renamed last, so an interrupted build never leaves a dataset that
looks finished, nor a mix of an old .idx with a new .bin.
"""
from __future__ import annotations

import array
import os
import re
import struct
import time
from typing import Dict, List, Sequence, Tuple, Type

import numpy as np

from megatron_ultralong.data.preprocess.prefix_lock import LOCK_STALE_S, host_tag, pid_dead_here

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes.
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}


class CompactIndexedDatasetBuilder:
    """megatron-core's `IndexedDatasetBuilder` output, array-backed, with batched writes."""

    def __init__(self, bin_path: str, dtype: Type[np.number]):
        self.dtype = dtype
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths = array.array("i")  # int32, as the .idx stores them
        self.document_indices = array.array("q", [0])  # int64
        self.tokens_written = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents whose tokens are concatenated in `tokens` [sum(lengths)].

        Same result as megatron-core's `add_document(doc, [len(doc)])` per document (one sequence
        per document, as preprocess_data.py writes without --split-sentences).
        """
        if int(lengths.sum()) != len(tokens):
            raise ValueError("add_documents: lengths do not add up to the token count")
        if len(lengths) and int(lengths.max()) >= 2**31:
            raise ValueError("add_documents: a document exceeds the .idx int32 length field")
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        start = len(self.sequence_lengths)
        self.sequence_lengths.extend(np.asarray(lengths, dtype=np.int32).tolist())
        self.document_indices.extend(range(start + 1, start + len(lengths) + 1))
        self.tokens_written += len(tokens)

    def add_document_parts(self, parts: Sequence[np.ndarray]) -> None:
        """Append one document made of consecutive parts (separator, BOS, text, EOS ...)."""
        n = 0
        for part in parts:
            self.data_file.write(np.ascontiguousarray(part, dtype=self.dtype).tobytes())
            n += len(part)
        if n >= 2**31:
            raise ValueError("add_document_parts: document exceeds the .idx int32 length field")
        self.sequence_lengths.append(n)
        self.document_indices.append(len(self.sequence_lengths))
        self.tokens_written += n

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32) if len(
            self.sequence_lengths) else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes(order="C"))


def read_index(idx_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(sequence lengths int32, byte pointers int64) of a .idx, memory-mapped (for the pool)."""
    with open(idx_path, "rb") as f:
        if f.read(9) != INDEX_HEADER or struct.unpack("<Q", f.read(8))[0] != 1:
            raise ValueError(f"{idx_path}: not a megatron .idx (version 1)")
        f.read(1)
        count = struct.unpack("<Q", f.read(8))[0]
        f.read(8)
        offset = f.tell()
    if count == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=offset, shape=(count,))
    pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=offset + 4 * count,
                         shape=(count,))
    return lengths, pointers


def token_dtype(vocab_size: int) -> Type[np.number]:
    """megatron-core's `DType.optimal_dtype`: uint16 below 65,500 ids, else int32 (Llama-3)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class AtomicOutputs:
    """Temporary paths for a set of outputs `prefix + suffix`, published together by `commit`."""

    def __init__(self, prefix: str, suffixes: Sequence[str], overwrite: bool, tag: str = "partial"):
        self.prefix = prefix
        directory, base = os.path.split(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self.final: Dict[str, str] = {s: prefix + s for s in suffixes}
        # The owner (host tag, pid) is in the name: `remove_stale_temporaries` can tell whose.
        self.temp: Dict[str, str] = {
            s: os.path.join(directory, f".{base}.{tag}-{os.getpid()}-{host_tag()}{s}")
            for s in suffixes
        }
        self.overwrite = overwrite
        self._refuse_existing()

    def _refuse_existing(self) -> None:
        if not self.overwrite:
            existing = [p for p in self.final.values() if os.path.exists(p)]
            if existing:
                raise FileExistsError(
                    f"output.prefix={self.prefix!r}: {existing[0]} exists (set output.overwrite=true "
                    "or pass --overwrite to replace it)"
                )

    def path(self, suffix: str) -> str:
        return self.temp[suffix]

    def commit(self, last: str = ".idx") -> List[str]:
        """Publish every temporary file; `last` (the loadable marker) goes last. Refuses, before
        renaming anything, if a temporary is missing (someone removed it: publishing the rest
        would pair this build's files with another's) or if, without overwrite, an output
        appeared while this build ran."""
        order = [s for s in self.final if s != last] + ([last] if last in self.final else [])
        missing = [self.temp[s] for s in order if not os.path.exists(self.temp[s])]
        if missing:
            raise FileNotFoundError(
                f"output.prefix={self.prefix!r}: temporary {missing[0]} disappeared during the "
                "build (removed by another process?); nothing was published")
        self._refuse_existing()
        if last in self.final and os.path.exists(self.final[last]):
            os.remove(self.final[last])  # an old .idx must never pair with a new .bin
        for s in order:
            os.replace(self.temp[s], self.final[s])
        return [self.final[s] for s in order]

    def abort(self) -> None:
        """Remove whatever temporary files exist (called on any failure)."""
        for p in self.temp.values():
            if os.path.exists(p):
                os.remove(p)


def remove_stale_temporaries(prefix: str, tags: Sequence[str] = ("pool", "partial"),
                             stale_s: float = LOCK_STALE_S) -> List[str]:
    """Delete `.BASE.<tag>-<pid>[-<host tag>].*` files beside `prefix` left by a build that is gone
    (SIGKILL, a node failure): the pool alone is 4 bytes per source token. A file is removed when
    its owner is known dead (`prefix_lock.pid_dead_here`: same host, boot and PID namespace, no
    such process) or when it has not been written for `stale_s` seconds; a pid from another node
    or namespace proves nothing, so such files are otherwise left alone. Call it holding the
    prefix's lock. Returns the removed paths."""
    directory, base = os.path.split(os.path.abspath(prefix))
    pattern = re.compile(rf"^\.{re.escape(base)}\.(?:{'|'.join(tags)})-(\d+)(?:-([0-9a-f]{{8}}))?\.")
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    mine = (os.getpid(), host_tag())
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid, tag = int(m.group(1)), m.group(2) or ""
        path = os.path.join(directory, name)
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            continue
        if (pid, tag) == mine or not (pid_dead_here(tag, pid) or age > stale_s):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
