"""Checks that run once, before step 1, so a week-long job fails in its first minute, not at step 1
or at its first save: output paths, token ids against the vocabulary, the data's length against the
schedule, and megatron's index cache against the data it was built from.

Each check runs on rank 0 (they read shared files) and its verdict is broadcast, so every rank raises
the same one-line ValueError (a rank raising alone would leave the others hanging in a collective).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch.distributed as dist

logger = logging.getLogger(__name__)

_SCAN_BLOCK = 64 << 20  # tokens per block of the .bin scan: bounded memory on any dataset size
FINGERPRINT_FILE = "ultralong_data_fingerprint.json"


def on_rank0(check: Callable[[], Optional[str]]) -> None:
    """Run `check` on rank 0 (it returns an error line or None); raise ValueError on every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    error = [None]
    if rank == 0:
        try:
            error[0] = check()
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error[0] = f"{type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])


# --- output paths ---

def output_problem(log_file: Optional[str], save_dir: Optional[str], tensorboard_dir: Optional[str]) -> Optional[str]:
    """An error line if a file the run will write cannot be written, checked now by writing."""
    if log_file:
        parent = os.path.dirname(os.path.abspath(log_file))
        try:
            os.makedirs(parent, exist_ok=True)  # created here, at start: not after step 1
            with open(log_file, "a", encoding="utf-8"):
                pass
        except OSError as e:
            return f"train.log_file={log_file}: cannot append ({e.strerror})"
    for field, path in (("train.save", save_dir), ("train.tensorboard_dir", tensorboard_dir)):
        if not path:
            continue
        try:
            os.makedirs(path, exist_ok=True)
            # A real write: os.access lies on root-squashed NFS and read-only bind mounts.
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
                pass
        except OSError as e:
            return f"{field}={path}: not writable ({e.strerror})"
    return None


# --- token ids ---

def _max_token(prefix: str) -> tuple[int, int]:
    """(largest token id in prefix.bin, its first position): a streaming scan of the memory map."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)  # kept alive: its __del__ closes the memory maps
    dtype = ds.index.dtype
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    best, where = -1, -1
    for start in range(0, len(tokens), _SCAN_BLOCK):
        block = tokens[start:start + _SCAN_BLOCK]
        m = int(block.max()) if len(block) else -1
        if m > best:
            best, where = m, start + int(np.argmax(block))
    del tokens, ds
    return best, where


def token_id_problem(paths, vocab_size: int, cache_dir: Optional[str] = None) -> Optional[str]:
    """An error line if a dataset holds a token id the model cannot embed (>= vocab_size).

    vocab_size: the model's real vocabulary (ids between it and the padded size would train against
    a never-trained output row: loss inf; ids past the padded size index out of range).
    cache_dir: remember each file's maximum next to megatron's index cache, keyed by the file's size
    and mtime, so a requeued job does not scan a 100 GB .bin again."""
    record = Path(cache_dir) / FINGERPRINT_FILE if cache_dir else None
    known = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    changed = False
    for prefix in paths:
        entry = known.get(os.path.abspath(prefix))
        if entry is not None and "max_token" in entry and {k: entry[k] for k in (".bin", ".idx")} == _fingerprint(prefix):
            best, where = entry["max_token"]
        else:
            best, where = _max_token(prefix)
            if record is not None:
                known[os.path.abspath(prefix)] = {**_fingerprint(prefix), "max_token": [best, where]}
                changed = True
        if best >= vocab_size:
            return (f"{prefix}.bin holds token id {best} (first at token {where}), outside the model's "
                    f"vocabulary of {vocab_size}: was it tokenized with another tokenizer?")
    if changed:
        _write_record(record, known)
    return None


def dataset_tokenizer_problem(paths, vocab_size: int, tokenizers: list[tuple[str, str]]) -> Optional[str]:
    """An error line if a dataset's PREFIX.dataset.json (data/dataset_info.py) says it was made with
    another tokenizer than the run's: a vocabulary larger than the model's, or a different token -> id
    map than each of `tokenizers` ((field, path): data.tokenizer, the starting checkpoint's own).
    Datasets without the file are checked by their ids alone (`token_id_problem`)."""
    from megatron_ultralong.data.dataset_info import info_path, read_dataset_info, same_tokenizer, tokenizer_identity

    identities = None  # hashed only when some dataset has the file to compare with
    for prefix in paths:
        info = read_dataset_info(prefix)
        if info is None:
            continue
        if identities is None:
            identities = [(name, tokenizer_identity(path)) for name, path in tokenizers]
        made = info.tokenizer
        if made.vocab_size > vocab_size:
            return (f"{info_path(prefix)}: tokenizer.vocab_size={made.vocab_size} ({made.path}) exceeds the model's "
                    f"vocabulary of {vocab_size}: the dataset was tokenized for another model")
        for name, ident in identities:
            if not same_tokenizer(made, ident):
                return (f"{info_path(prefix)}: tokenized with {made.path} (vocab {made.vocab_size}), which is not "
                        f"{name}={ident.path} (vocab {ident.vocab_size}): the ids would mean other tokens; rebuild "
                        "the dataset with the model's tokenizer")
    return None


def _write_record(record: Path, body: dict) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, record)


def sft_token_id_problem(dataset, paths, pad_token_id: int, vocab_size: int) -> Optional[str]:
    """The same check for chat data: SFTDataset keeps every tokenized conversation in one flat id
    array (data/samples/sft.py, `_ids`); its maximum and the padding id must fit the vocabulary."""
    ids = getattr(dataset, "_ids", None)
    best = int(ids.max()) if ids is not None and len(ids) else -1
    if best >= vocab_size:
        return (f"data.paths={list(paths)}: the tokenizer (data.tokenizer) produced token id {best}, outside "
                f"the model's vocabulary of {vocab_size}")
    if pad_token_id >= vocab_size:
        return f"data.pad_token_id={pad_token_id} is outside the model's vocabulary of {vocab_size}"
    return None


# --- data length against the schedule ---

def epoch_warnings(paths, weights, seq_length: int, num_samples: int, steps: int, global_batch: int) -> list[str]:
    """Warnings for datasets the schedule reads more than once (megatron's GPTDataset then starts a
    second epoch: the same documents again, in a new order)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weights = list(weights) if weights else [1.0] * len(paths)
    total = sum(weights)
    out = []
    for prefix, w in zip(paths, weights):
        ds = IndexedDataset(prefix, mmap=True)  # kept alive: its __del__ closes the map under the view
        tokens = int(ds.index.sequence_lengths.sum(dtype=np.int64))
        del ds
        per_epoch = max(0, (tokens - 1) // seq_length)
        needed = int(np.ceil(num_samples * w / total))
        if needed > per_epoch:
            at_step = per_epoch * total / w / global_batch if per_epoch else 0
            out.append(
                f"{prefix}: {tokens} tokens = {per_epoch} samples of {seq_length} per epoch, the schedule "
                f"({steps} steps x {global_batch}) reads {needed}: a second epoch (the same documents "
                f"again) starts around step {int(at_step) + 1}"
            )
    return out


def warn_if_schedule_exceeds_data(cfg, num_samples: int, dataset_len: Optional[int] = None) -> list[str]:
    """Log (rank 0) when the run will see its data more than once; returns the warnings."""
    data, t = cfg.data, cfg.train
    if data.kind == "pretrain":
        warnings = epoch_warnings(data.paths, data.weights, data.seq_length, num_samples, t.steps, t.global_batch_size)
    elif dataset_len is not None and num_samples > dataset_len:
        warnings = [f"data.paths: {dataset_len} samples, the schedule ({t.steps} steps x {t.global_batch_size}) "
                    f"reads {num_samples}: a second epoch starts at step {dataset_len // t.global_batch_size + 1}"]
    else:
        warnings = []
    for w in warnings:
        logger.warning(w)
    return warnings


# --- megatron's index cache against the data it was built from ---

def _fingerprint(prefix: str) -> dict:
    out = {}
    for ext in (".bin", ".idx"):
        st = os.stat(prefix + ext)
        out[ext] = [st.st_size, st.st_mtime_ns]
    return out


def missing_data_problem(paths) -> Optional[str]:
    """The first missing .bin/.idx (the same line data/samples/pretrain.py raises, before our scans)."""
    for prefix in paths:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                return f"data.paths: {prefix + ext} does not exist"
    return None


def stale_cache_problem(paths, cache_dir: str) -> Optional[str]:
    """An error line if a dataset changed since megatron built its sample index in cache_dir.

    megatron-core keys its cache by the dataset's path and the config, not by its content, so a
    dataset rebuilt in place would be read through the old document/sample index: wrong samples, or
    an IndexError deep inside. We record each dataset's size and mtime next to that cache."""
    record = Path(cache_dir) / FINGERPRINT_FILE
    known = json.loads(record.read_text()) if record.is_file() else {}
    current = {os.path.abspath(p): _fingerprint(p) for p in paths}
    for path, fp in current.items():
        old = known.get(path)
        if old is not None and {k: old.get(k) for k in fp} != fp:
            return (f"{path}.bin/.idx changed since megatron's sample index in {cache_dir} was built from it: "
                    f"delete {cache_dir} (or set data.cache_dir to a new directory) so it is rebuilt")
    new = {p: fp for p, fp in current.items() if p not in known}
    if new:
        _write_record(record, {**known, **new})
    return None


def index_cache_dir(data) -> str:
    """Where data/samples/pretrain.py tells megatron to cache (same rule, kept in step with it)."""
    return data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(data.paths[0])), "cache")
