"""Stage 1: raw batches -> N worker processes (parse, validate, tokenize) -> a token pool on disk.

The pool is a Megatron indexed dataset of every valid source document (written with
`CompactIndexedDatasetBuilder`) plus two flat side files: the domain id (uint16) and the 64-bit
content key (uint64) of each document. Stage 2 plans from its lengths, stage 3 copies from it, so
each document is tokenized exactly once however many times it is emitted.

Workers are *forked* from the main process once it has built the tokenizer backend, so they start
with it (the tiktoken encoding, and HF where exception spans need it) instead of each importing
the modules, parsing a 9 MB tokenizer.json and loading HF again (~1 s of CPU per worker for a 128K
vocabulary, most of a 20 MB build). HF's rayon pool is the one thing that does not survive a fork:
`TOKENIZERS_PARALLELISM=false` is set before forking (a worker parallelises over nothing anyway),
and the main process starts its own threads only after the fork. Where fork is unavailable
(macOS, Windows) they are spawned and rebuild the backend from its spec. At most
`2 * workers + 2` batches are in flight, so memory stays bounded whatever the corpus size:
`Pool.imap` would instead read the whole input ahead into its queue.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from megatron_ultralong.data.preprocess.forking import child_signals, forking_without_handlers
from megatron_ultralong.data.preprocess.readers import BadRecord, RawBatch, parse_batch
from megatron_ultralong.data.preprocess.tokenizer_backends import (
    BackendSpec,
    TiktokenTokenizerBackend,
    TokenizerBackend,
    load_backend,
)


@dataclass
class EncodedBatch:
    """A worker's answer for one raw batch."""

    tokens: np.ndarray
    lengths: np.ndarray
    domains: List[str]
    keys: np.ndarray
    bad: List[BadRecord]
    blank_lines: int
    records: int
    counters: Dict[str, float] = field(default_factory=dict)
    file_bytes: int = 0


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs besides the raw batches."""

    backend: BackendSpec
    text_field: str
    domain_field: Optional[str]
    known_domains: Optional[frozenset]


_WORKER: Dict[str, object] = {}  # per worker process: the config and the loaded backend


def _init_worker(cfg: WorkerConfig, backend: Optional[TokenizerBackend] = None) -> None:
    """backend: the main process's, inherited through fork (None: built here from the spec)."""
    if mp.parent_process() is not None:
        child_signals()  # Ctrl-C and SIGTERM are the parent's to handle (forking.py)
    _WORKER["cfg"] = cfg
    _WORKER["backend"] = backend if backend is not None else load_backend(cfg.backend)


def encode_raw_batch(batch: RawBatch) -> EncodedBatch:
    """Parse + validate + tokenize one raw batch (runs in a worker)."""
    cfg: WorkerConfig = _WORKER["cfg"]  # type: ignore[assignment]
    backend = _WORKER["backend"]
    parsed = parse_batch(batch, cfg.text_field, cfg.domain_field, cfg.known_domains)
    keys = np.asarray(parsed.keys, dtype=np.uint64)
    counters: Dict[str, float] = {}
    if isinstance(backend, TiktokenTokenizerBackend):
        before = backend.counters
        ids = backend.encode_batch(parsed.texts, keys)
        counters = {k: v - before[k] for k, v in backend.counters.items()}
    else:
        ids = backend.encode_batch(parsed.texts) if parsed.texts else []
    parsed.texts = []  # a huge document's text goes before the concatenation below
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    # Straight into int32 (same_kind casting): no int64 copy of the batch's tokens in between.
    tokens = np.concatenate(ids, dtype=np.int32) if ids else np.zeros(0, dtype=np.int32)
    del ids
    return EncodedBatch(
        tokens=tokens, lengths=lengths, domains=parsed.domains, keys=keys, bad=parsed.bad,
        blank_lines=parsed.blank_lines, records=len(batch.lines) + len(batch.rows) - parsed.blank_lines,
        counters=counters, file_bytes=batch.file_bytes,
    )


@contextlib.contextmanager
def worker_pool(cfg: WorkerConfig, workers: int,
                backend: Optional[TokenizerBackend] = None) -> Iterator[Callable[[Iterable[RawBatch]], Iterable[EncodedBatch]]]:
    """`workers` processes (0: this one) for the duration of the block; yields a function that
    maps raw batches to encoded batches in input order. `backend`: the main process's, which
    forked workers start with (module docstring)."""
    if workers == 0:
        _init_worker(cfg, backend)
        yield lambda batches: (encode_raw_batch(b) for b in batches)
        return
    fork = "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    if fork:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C reaches the whole process group, workers included: a worker must neither unwind nor
    # print a traceback, even one still starting. SIGINT ignored while forking is inherited
    # (and survives a spawned worker's exec: Python installs its handler only over the default
    # one); forking.py has the rest.
    with forking_without_handlers():
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, backend if fork else None))

    def encode(batches: Iterable[RawBatch]) -> Iterable[EncodedBatch]:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(encode_raw_batch, (batch,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    with pool:
        yield encode


@dataclass
class PoolSummary:
    """What stage 1 saw."""

    documents: int = 0
    tokens: int = 0
    records: int = 0
    blank_lines: int = 0
    bad: Dict[str, int] = field(default_factory=dict)
    bad_examples: List[str] = field(default_factory=list)
    counters: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def tokenize_to_pool(
    encoded: Iterable[EncodedBatch],
    builder,
    domain_ids: Dict[str, int],
    dom_file,
    key_file,
    skip_bad: bool,
    on_progress: Callable[[int, int, int], None],
) -> PoolSummary:
    """Append every valid document of the workers' answers to the pool (in input order).

    Raises `BadInputError` on the first bad record unless `skip_bad`; `domain_ids` is extended
    with domains in order of first appearance (declared domains are pre-seeded by the caller).
    """
    from megatron_ultralong.data.preprocess.readers import BadInputError

    summary = PoolSummary()
    start = time.perf_counter()
    for enc in encoded:
        if enc.bad:
            fatal = [b for b in enc.bad if b.reason != "blank line"]  # a blank line holds no data
            if fatal and not skip_bad:
                raise BadInputError(fatal[0])
            for b in enc.bad:
                summary.bad[b.reason] = summary.bad.get(b.reason, 0) + 1
                if len(summary.bad_examples) < 20:
                    summary.bad_examples.append(b.message())
        summary.records += enc.records
        summary.blank_lines += enc.blank_lines
        for k, v in enc.counters.items():
            summary.counters[k] = summary.counters.get(k, 0) + v
        if not len(enc.lengths):
            on_progress(enc.file_bytes, 0, 0)
            continue
        ids = np.fromiter((domain_ids.setdefault(d, len(domain_ids)) for d in enc.domains),
                          dtype=np.uint16, count=len(enc.domains))
        if len(domain_ids) > np.iinfo(np.uint16).max:
            raise ValueError("inputs: more than 65535 distinct domains")
        builder.add_documents(enc.tokens, enc.lengths)
        ids.tofile(dom_file)
        enc.keys.tofile(key_file)
        summary.documents += len(enc.lengths)
        summary.tokens += len(enc.tokens)
        on_progress(enc.file_bytes, len(enc.lengths), len(enc.tokens))
    summary.seconds = time.perf_counter() - start
    return summary


def split_sample(
    batches: Iterable[RawBatch], cfg: WorkerConfig, want_docs: int
) -> Tuple[List[str], List[RawBatch], Iterable[RawBatch]]:
    """Parse the first batches until `want_docs` valid texts are seen (for the fast-path proof).

    Returns (texts, the batches consumed, the rest of the iterator); the consumed batches are
    processed again by the workers, so nothing is lost or double counted.
    """
    it = iter(batches)
    texts: List[str] = []
    consumed: List[RawBatch] = []
    while len(texts) < want_docs:
        batch = next(it, None)
        if batch is None:
            break
        consumed.append(batch)
        texts += parse_batch(batch, cfg.text_field, cfg.domain_field, cfg.known_domains).texts
    return texts[:want_docs], consumed, it
