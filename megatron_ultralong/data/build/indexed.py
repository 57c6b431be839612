"""Writing Megatron .bin/.idx through megatron-core's own builder, with bounded memory and
atomic outputs.

`CompactIndexedDatasetBuilder` is megatron-core's `IndexedDatasetBuilder` (same .bin bytes, same
.idx writer) with its per-document bookkeeping in typed arrays: 12 bytes per document instead of
~70 for Python lists of ints, and the .idx pointers computed with numpy instead of a Python list
(the list is what ran out of memory at finalize in bigcode-project/Megatron-LM#34).

`AtomicOutputs` writes every output under a hidden temporary name in the target directory and
renames when the build is complete: the .idx, which is what makes a prefix loadable, is removed
first (when overwriting) and renamed last, so an interrupted build never leaves a dataset that
looks finished, nor a mix of an old .idx with a new .bin.
"""
from __future__ import annotations

import array
import os
import re
from typing import Dict, List, Sequence, Type

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    _IndexWriter,
)


class _NumpyPointersIndexWriter(_IndexWriter):
    """megatron-core's .idx writer; only the pointer computation is vectorised."""

    def _sequence_pointers(self, sequence_lengths: Sequence[int]) -> np.ndarray:
        lengths = np.frombuffer(sequence_lengths, dtype=np.int32) if isinstance(
            sequence_lengths, array.array) else np.asarray(sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * DType.size(self.dtype), out=pointers[1:])
        return pointers


class CompactIndexedDatasetBuilder(IndexedDatasetBuilder):
    """`IndexedDatasetBuilder` with array-backed bookkeeping and batched document writes."""

    def __init__(self, bin_path: str, dtype: Type[np.number]):
        super().__init__(bin_path, dtype=dtype, multimodal=False)
        self.sequence_lengths = array.array("i")  # int32, as the .idx stores them
        self.document_indices = array.array("q", [0])  # int64
        self.tokens_written = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents whose tokens are concatenated in `tokens` [sum(lengths)].

        Same result as calling `add_document(doc, [len(doc)])` per document (one sequence per
        document, as preprocess_data.py writes without --split-sentences).
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
        with _NumpyPointersIndexWriter(idx_path, self.dtype) as writer:
            writer.write(self.sequence_lengths, self.sequence_modes, self.document_indices)


def token_dtype(vocab_size: int) -> Type[np.number]:
    """megatron-core's choice: uint16 below 65,500 ids, else int32 (Llama-3: int32)."""
    return DType.optimal_dtype(vocab_size)


class AtomicOutputs:
    """Temporary paths for a set of outputs `prefix + suffix`, published together by `commit`."""

    def __init__(self, prefix: str, suffixes: Sequence[str], overwrite: bool, tag: str = "partial"):
        self.prefix = prefix
        directory, base = os.path.split(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self.final: Dict[str, str] = {s: prefix + s for s in suffixes}
        self.temp: Dict[str, str] = {
            s: os.path.join(directory, f".{base}.{tag}-{os.getpid()}{s}") for s in suffixes
        }
        if not overwrite:
            existing = [p for p in self.final.values() if os.path.exists(p)]
            if existing:
                raise FileExistsError(
                    f"output.prefix={prefix!r}: {existing[0]} exists (set output.overwrite=true "
                    "or pass --overwrite to replace it)"
                )

    def path(self, suffix: str) -> str:
        return self.temp[suffix]

    def commit(self, last: str = ".idx") -> List[str]:
        """Publish every temporary file; `last` (the loadable marker) goes last."""
        order = [s for s in self.final if s != last] + ([last] if last in self.final else [])
        if last in self.final and os.path.exists(self.final[last]):
            os.remove(self.final[last])  # an old .idx must never pair with a new .bin
        for s in order:
            if os.path.exists(self.temp[s]):
                os.replace(self.temp[s], self.final[s])
        return [self.final[s] for s in order]

    def abort(self) -> None:
        """Remove whatever temporary files exist (called on any failure)."""
        for p in self.temp.values():
            if os.path.exists(p):
                os.remove(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(prefix: str, tags: Sequence[str] = ("pool", "partial")) -> List[str]:
    """Delete `.BASE.<tag>-<pid>.*` files beside `prefix` left by a build whose process is gone
    (SIGKILL, a node failure): the pool alone is 4 bytes per source token. Files of a live process
    (a concurrent build of the same prefix) are left alone. Returns the removed paths."""
    directory, base = os.path.split(os.path.abspath(prefix))
    pattern = re.compile(rf"^\.{re.escape(base)}\.(?:{'|'.join(tags)})-(\d+)\.")
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            path = os.path.join(directory, name)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed
