"""`build_dataset(recipe)`: the whole pipeline, top to bottom.

    inputs --(stage 1: tokenize once, N workers)--> token pool (.bin/.idx + domain/key side files)
           --(stage 2: per-domain class totals -> sampling plan)-->
           --(stage 3: copies per document, separators, Megatron IndexedDatasetBuilder)--> PREFIX.bin/.idx
           --> PREFIX.stats.json / .stats.md / .lengths.png, PREFIX.dataset.json (data/dataset_info.py)

Why a pool instead of one streaming pass: the budget scale m_d of each domain needs the domain's
token totals per length class, known only after the whole input is read. Estimating lengths from
characters (Fu et al.'s chars/3.68) would allow one pass but not exact budgets; tokenizing twice
would double the expensive part. The pool costs disk (4 bytes a token for Llama-3), not memory,
and is deleted at the end. Copies of a document are written in separate sweeps over the pool
(sweep r writes the documents with more than r copies), so repeats land a corpus apart rather than
back to back; GPTDataset shuffles documents at training time anyway.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ultralong.data.dataset_info import SUFFIX as DATASET_INFO_SUFFIX
from megatron_ultralong.data.dataset_info import DatasetInfo, tokenizer_identity, write_dataset_info
from megatron_ultralong.data.preprocess import upsample
from megatron_ultralong.data.preprocess.indexed import (
    AtomicOutputs,
    CompactIndexedDatasetBuilder,
    read_index,
    remove_stale_temporaries,
    token_dtype,
)
from megatron_ultralong.data.preprocess.prefix_lock import PrefixLock
from megatron_ultralong.data.preprocess.progress import StageProgress
from megatron_ultralong.data.preprocess.readers import expand_inputs, iter_raw_batches
from megatron_ultralong.data.preprocess.recipe import BuildRecipe, recipe_to_dict
from megatron_ultralong.data.preprocess.fast_path_proof import FileProof, check_corpus_sample, prove_file
from megatron_ultralong.data.preprocess.length_plot import HistogramPainter
from megatron_ultralong.data.preprocess.stats import LengthStats, write_report
from megatron_ultralong.data.preprocess.tiktoken_path import hf_tokenizer
from megatron_ultralong.data.preprocess.tokenize_stage import WorkerConfig, split_sample, tokenize_to_pool, worker_pool
from megatron_ultralong.data.preprocess.tokenizer_backends import (
    BackendSpec,
    TiktokenTokenizerBackend,
    TokenizerBackend,
    load_backend,
    special_token_ids,
)

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".bin", ".stats.json", ".stats.md", ".lengths.png", DATASET_INFO_SUFFIX, ".idx")
POOL_SUFFIXES = (".bin", ".idx", ".dom", ".key")
CHUNK_DOCS = 1 << 16  # documents per vectorised step when planning and writing


@dataclass(frozen=True)
class BackendChoice:
    """The tokenizer backend a build uses, and what decided it."""

    spec: BackendSpec
    info: Dict[str, Any]
    """For the report's "tokenizer" section."""
    proof: Optional[FileProof] = None
    """With the tiktoken backend: the file's proof; the corpus sample is checked beside the
    workers (`_beside_workers`)."""


def choose_backend(recipe: BuildRecipe) -> BackendChoice:
    """tiktoken when the file is proven equivalent (and allowed), else the recipe's own tokenizer."""
    tok = recipe.tokenizer
    if not os.path.isfile(tok.path):
        raise ValueError(f"tokenizer.path={tok.path!r}: no such file")
    threads = recipe.workers == 0
    info: Dict[str, Any] = {"path": tok.path, "kind": tok.kind, "fast_path": tok.fast_path}
    if tok.kind == "sentencepiece":
        if tok.fast_path == "require":
            raise ValueError("tokenizer.fast_path='require': no fast path for SentencePiece models")
        info.update(backend="sentencepiece", fast_path_reasons=["SentencePiece model"])
        return BackendChoice(BackendSpec("sentencepiece", tok.path), info)
    if tok.fast_path == "off":
        info.update(backend="hf", fast_path_reasons=["tokenizer.fast_path='off'"])
        return BackendChoice(_hf_spec(recipe), info)
    t0 = time.perf_counter()
    proof = prove_file(tok.path, tok.special_tokens_in_text, tok.proof_cache_dir)
    info["proof_seconds"] = round(time.perf_counter() - t0, 2)
    if not proof.ok:
        return _refuse_fast_path(recipe, info, proof.reasons)
    logger.info("tiktoken fast path proven equivalent to HF in %.1f s (%d exception strings: "
                "their pre-tokens go to HF)", info["proof_seconds"], len(proof.parts.routed))
    info.update(backend="tiktoken", proof_checks=dict(proof.checks),
                mismatched_code_points=[f"U+{c:04X}" for c in proof.mismatched_code_points],
                routed_strings=[r.decode("utf-8", "backslashreplace") for r in proof.parts.routed[:50]])
    spec = BackendSpec("tiktoken", tok.path, tok.special_tokens_in_text, proof.hf_only_chars,
                       proof.parts.routed, proof.tainted_ids, proof.parts, hf_threads=threads)
    return BackendChoice(spec, info, proof)


def _hf_spec(recipe: BuildRecipe) -> BackendSpec:
    tok = recipe.tokenizer
    return BackendSpec("hf", tok.path, tok.special_tokens_in_text, hf_threads=recipe.workers == 0)


def _refuse_fast_path(recipe: BuildRecipe, info: Dict[str, Any], reasons: Sequence[str]) -> BackendChoice:
    logger.info("tiktoken fast path refused (%s); using HF tokenizers", "; ".join(reasons))
    if recipe.tokenizer.fast_path == "require":
        raise ValueError("tokenizer.fast_path='require' but the tiktoken path is not "
                         "equivalent: " + "; ".join(reasons))
    info = {k: v for k, v in info.items() if k in ("path", "kind", "fast_path", "proof_seconds")}
    info.update(backend="hf", fast_path_reasons=list(reasons))
    return BackendChoice(_hf_spec(recipe), info)


def _beside_workers(recipe: BuildRecipe, choice: BackendChoice, sample: List[str]):
    """What the main process does while its workers tokenize (on a thread: HF's encode and the
    hashing release the GIL): the corpus sample of the proof and, unless the proof holds it, the
    tokenizer's identity for PREFIX.dataset.json. Returns (the reason the sample refutes the fast
    path or None, the sample's counts, the identity)."""
    tok = recipe.tokenizer
    reason, counts = None, {}
    if choice.proof is not None:
        t0 = time.perf_counter()
        reason, counts = check_corpus_sample(tok.path, tok.special_tokens_in_text, choice.proof, sample)
        counts["corpus_sample_s"] = round(time.perf_counter() - t0, 2)
    identity = choice.proof.identity if choice.proof is not None else None
    if identity is None:
        loaded = hf_tokenizer(tok.path, tok.special_tokens_in_text) if tok.kind == "hf" else None
        identity = tokenizer_identity(tok.path, loaded)
    return reason, counts, identity


def document_affixes(recipe: BuildRecipe, backend: TokenizerBackend) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Token ids written before and after every output document, and how many are separators."""
    sep_cfg = recipe.separator
    if sep_cfg.text:
        sep = backend.encode_batch([sep_cfg.text])[0]
        what = f"literal {sep_cfg.text!r} -> ids {sep.tolist()}"
    elif sep_cfg.tokens:
        sep = np.asarray(special_token_ids(backend, sep_cfg.tokens, "separator.tokens"), dtype=np.int64)
        what = f"tokens {list(sep_cfg.tokens)} -> ids {sep.tolist()}"
    else:
        sep = np.zeros(0, dtype=np.int64)
        what = "none"
    bos = special_token_ids(backend, [sep_cfg.bos_token], "separator.bos_token") if sep_cfg.add_bos else []
    eos = special_token_ids(backend, [sep_cfg.eos_token], "separator.eos_token") if sep_cfg.add_eos else []
    if sep_cfg.position == "prefix":
        prefix, suffix = np.concatenate([sep, bos]), np.asarray(eos, dtype=np.int64)
    else:
        prefix, suffix = np.asarray(bos, dtype=np.int64), np.concatenate([eos, sep])
    info = {"description": f"{what}, {sep_cfg.position}; bos={bos or 'no'}, eos={eos or 'no'}",
            "separator_ids": sep.tolist(), "bos_ids": bos, "eos_ids": eos}
    return prefix.astype(np.int64), suffix.astype(np.int64), info


class BuildTerminated(SystemExit):
    """SIGTERM (Slurm's scancel, a preemption) during a build: unwinds so temporaries go."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """Turn SIGTERM into an exception while building, so the `finally` that deletes the pool
    and partial outputs runs (the default action kills the process and leaves GBs behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise BuildTerminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_dataset(recipe: BuildRecipe, progress: Optional[bool] = None,
                  progress_interval_s: float = 30.0) -> Dict[str, Any]:
    """Build PREFIX.bin/.idx and the report from a recipe; returns the report dict.

    progress: None shows a bar on a terminal and logs a status line every
    `progress_interval_s` seconds otherwise; False shows nothing."""
    t_start = time.perf_counter()
    files = expand_inputs(recipe.inputs)  # missing inputs fail before any work
    lock = PrefixLock(recipe.output.prefix)  # one build per prefix, across nodes (prefix_lock)
    broken = lock.acquire()
    if broken:
        logger.warning("took over the lock of a build that is gone (host %s, pid %s)",
                       broken.get("host"), broken.get("pid"))
    try:
        for path in remove_stale_temporaries(recipe.output.prefix):
            logger.warning("removed %s, left by an earlier build that did not finish", path)
        with _sigterm_unwinds():
            outputs = AtomicOutputs(recipe.output.prefix, OUTPUT_SUFFIXES, recipe.output.overwrite)
            pool = AtomicOutputs(recipe.output.prefix, POOL_SUFFIXES, overwrite=True, tag="pool")
            try:
                # Forked now, while this process is small; it draws PREFIX.lengths.png at the end.
                with HistogramPainter() as painter:
                    report = _build(recipe, files, outputs, pool, (progress, progress_interval_s),
                                    t_start, painter)
                lock.verify()
                outputs.commit(last=".idx")
                return report
            except BaseException:
                outputs.abort()
                raise
            finally:
                pool.abort()
    finally:
        lock.release()


def _build(recipe, files, outputs, pool, progress, t_start, painter) -> Dict[str, Any]:
    cfg = recipe.upsampling
    declared = list(cfg.domains)
    worker_cfg = WorkerConfig(
        backend=BackendSpec("hf", recipe.tokenizer.path),  # replaced below once chosen
        text_field=recipe.text_field, domain_field=recipe.domain_field,
        known_domains=frozenset(declared) if declared else None,
    )
    phases: Dict[str, float] = {}
    # 1. Pick the tokenizer backend (the file's proof; the corpus sample is checked in stage 1).
    sample_n = recipe.tokenizer.verify_docs if recipe.tokenizer.kind == "hf" else 0
    sample, consumed, rest = split_sample(iter_raw_batches(recipe), worker_cfg, sample_n)
    choice = choose_backend(recipe)

    # 2. Stage 1: tokenize everything once into the pool.
    enabled, interval = progress
    total_bytes = sum(os.path.getsize(f) for f, _ in files)
    summary, choice, affixes, dtype, identity, domain_ids = _tokenize_stage(
        recipe, worker_cfg, choice, itertools.chain(consumed, rest), sample, pool,
        (enabled, interval, total_bytes), lambda: phases.setdefault("setup_s", round(time.perf_counter() - t_start, 2)))
    prefix_ids, suffix_ids, sep_info = affixes
    tok_info = choice.info
    # Where setup and tokenize went: the proof (part of setup) and the workers' seconds spent on
    # exception spans (summed over workers, part of tokenize).
    phases["proof_s"] = tok_info.get("proof_seconds", 0.0)
    phases["routing_s"] = round(summary.counters.pop("routing_s", 0.0), 2)
    if "corpus_sample_s" in tok_info.get("proof_checks", {}):
        phases["corpus_sample_s"] = tok_info["proof_checks"].pop("corpus_sample_s")
    domains = sorted(domain_ids, key=domain_ids.get)

    # 3. Stage 2: per (domain, length class) totals -> sampling plan.
    pool_prefix = pool.path(".bin")[: -len(".bin")]
    pool_ds, lengths, pointers, doms, keys = _open_pool(pool_prefix, pool)
    itemsize = np.dtype(dtype).itemsize
    extra = len(prefix_ids) + len(suffix_ids)
    totals = upsample.ClassTotals.zeros(len(domains))
    edges = np.asarray(recipe.output.length_buckets, dtype=np.int64)
    before, after = LengthStats(domains, edges), LengthStats(domains, edges)
    for s in range(0, len(lengths), CHUNK_DOCS):
        ln, dm = lengths[s:s + CHUNK_DOCS].astype(np.int64), doms[s:s + CHUNK_DOCS]
        totals.add(dm, ln, cfg)
        before.add(dm, ln)
    plans = upsample.plan_domains(domains, totals, cfg, extra)
    targets = upsample.expected_by_class(plans, totals, extra)
    realised = np.zeros_like(targets)
    phases["plan_s"] = round(time.perf_counter() - t_start - phases["setup_s"] - summary.seconds, 2)

    # 4. Stage 3: write copies, sweep by sweep, through megatron-core's builder.
    out = CompactIndexedDatasetBuilder(outputs.path(".bin"), dtype)
    weights = upsample.weight_table(plans)
    bar = StageProgress("write", int(round(targets.sum())), "tok", enabled, interval)
    t_write = time.perf_counter()
    # Document tokens are read with plain file reads, not through an mmap: mapped pages would
    # count in this process's RSS and make it grow with the pool (page cache serves both anyway).
    with open(pool.path(".bin"), "rb", buffering=0) as pool_bin:
        for sweep in range(upsample.max_copies(plans)):
            for s in range(0, len(lengths), CHUNK_DOCS):
                ln, dm = lengths[s:s + CHUNK_DOCS].astype(np.int64), doms[s:s + CHUNK_DOCS]
                starts = pointers[s:s + CHUNK_DOCS]
                copies = upsample.copies_per_document(keys[s:s + CHUNK_DOCS], dm, ln, weights, cfg)
                if sweep == 0:
                    after.add(dm, ln, copies)
                    upsample.add_realised(realised, dm, ln, copies, cfg, extra)
                for i in np.nonzero(copies > sweep)[0]:
                    doc = np.frombuffer(os.pread(pool_bin.fileno(), int(ln[i]) * itemsize,
                                                 int(starts[i])), dtype=dtype)
                    step = cfg.max_doc_tokens or max(1, len(doc))
                    for p in range(0, len(doc), step):
                        out.add_document_parts((prefix_ids, doc[p:p + step], suffix_ids))
                bar.update(out.tokens_written - bar.done, 0, out.tokens_written - bar.done)
    bar.close()
    out.finalize(outputs.path(".idx"))
    del pool_ds, lengths, pointers, doms, keys
    if not len(out.sequence_lengths):  # an empty dataset is never what was asked for
        why = (f"upsampling.total_tokens={cfg.total_tokens}: the budget keeps no document"
               if cfg.total_tokens else "no document was kept")
        raise ValueError(f"{why} (the inputs hold {summary.documents:,} valid documents, "
                         f"{summary.tokens:,} tokens); nothing was written")

    # 5. Report.
    n_out_docs = len(out.sequence_lengths)
    report = {
        "output": {"prefix": recipe.output.prefix, "documents": n_out_docs,
                   "tokens": int(out.tokens_written), "dtype": np.dtype(dtype).name},
        "tokenizer": {**tok_info, **summary.counters},
        "input": {"files": len(files), "records": summary.records, "blank_lines": summary.blank_lines,
                  "documents": summary.documents, "tokens": summary.tokens},
        "skipped": {"total": sum(summary.bad.values()), "by_reason": summary.bad,
                    "examples": summary.bad_examples},
        "budget": {"total_tokens": cfg.total_tokens, "realised_over_target":
                   out.tokens_written / cfg.total_tokens if cfg.total_tokens else None,
                   "by_domain_class": upsample.realised_vs_target(domains, targets, realised)},
        "separators": {**sep_info, "tokens_inserted": n_out_docs * len(sep_info["separator_ids"]),
                       "affix_tokens_per_document": extra},
        "plan": upsample.plans_as_dict(plans),
        "source": before.as_dict(),
        "output_documents": after.as_dict(),
        "timing": {"tokenize_s": round(summary.seconds, 2),
                   "tokenize_tokens_per_s": summary.tokens / max(summary.seconds, 1e-9),
                   "write_s": round(time.perf_counter() - t_write, 2), **phases,
                   "total_s": round(time.perf_counter() - t_start, 2), "workers": recipe.workers},
        "recipe": recipe_to_dict(recipe),
    }
    write_report(report, outputs.path(".stats.json"), outputs.path(".stats.md"))
    # What the trainer needs to read these ids (separator, tokenizer), beside the .bin/.idx.
    write_dataset_info(outputs.path(DATASET_INFO_SUFFIX), DatasetInfo(
        separator_text=recipe.separator.text or None, separator_ids=tuple(sep_info["separator_ids"]),
        separator_position=recipe.separator.position, bos_ids=tuple(sep_info["bos_ids"]),
        eos_ids=tuple(sep_info["eos_ids"]), tokenizer=identity))
    painter.paint(before, after, outputs.path(".lengths.png"), os.path.basename(recipe.output.prefix),
                  (cfg.short_threshold, cfg.long_threshold))
    return report


def _tokenize_stage(recipe, worker_cfg, choice: BackendChoice, batches, sample, pool, progress,
                    mark_setup_done):
    """Stage 1 into the pool's files. The main process builds the backend, the workers fork with
    it, and then, beside them, the corpus sample of the fast path's proof is checked
    (`_beside_workers`); if the sample refutes the fast path, stage 1 runs again with HF.
    Returns (summary, the backend choice, the affixes, the token dtype, the tokenizer identity,
    the domain ids)."""
    enabled, interval, total_bytes = progress
    while True:
        backend = load_backend(choice.spec)
        if isinstance(backend, TiktokenTokenizerBackend) and choice.spec.tainted_ids:
            backend.hf  # every worker needs HF for exception spans: loaded once, before the fork
        affixes = document_affixes(recipe, backend)
        dtype = token_dtype(backend.vocab_size)
        cfg = replace(worker_cfg, backend=choice.spec)
        domain_ids: Dict[str, int] = {d: i for i, d in enumerate(recipe.upsampling.domains)}
        builder = CompactIndexedDatasetBuilder(pool.path(".bin"), dtype)
        bar = StageProgress("tokenize", total_bytes, "B", enabled, interval)
        mark_setup_done()
        # The side thread starts after the fork: a forked worker gets only the forking thread.
        with ThreadPoolExecutor(1, thread_name_prefix="beside-workers") as side_pool, \
                open(pool.path(".dom"), "wb") as dom_f, open(pool.path(".key"), "wb") as key_f, \
                worker_pool(cfg, recipe.workers, backend) as encode:
            side = side_pool.submit(_beside_workers, recipe, choice, sample)
            summary = tokenize_to_pool(encode(batches), builder, domain_ids, dom_f, key_f,
                                       recipe.skip_bad, bar.update)
        bar.close()
        reason, counts, identity = side.result()
        if reason is None:
            builder.finalize(pool.path(".idx"))
            if choice.proof is not None:
                choice.info["proof_checks"].update(counts)
            return summary, choice, affixes, dtype, identity, domain_ids
        choice = _refuse_fast_path(recipe, choice.info, [reason])
        batches = iter_raw_batches(recipe)


def _open_pool(prefix: str, pool: AtomicOutputs) -> Tuple[Any, ...]:
    """Per-document pool arrays, memory-mapped (nothing per document is copied into memory):
    lengths and byte pointers from the pool's .idx, domain ids and keys raw."""

    def mm(path: str, dt) -> np.ndarray:
        return np.memmap(path, dtype=dt, mode="r") if os.path.getsize(path) else np.zeros(0, dt)

    doms, keys = mm(pool.path(".dom"), np.uint16), mm(pool.path(".key"), np.uint64)
    lengths, pointers = read_index(pool.path(".idx"))
    return None, lengths, pointers, doms, keys
