"""SFT samples: chat JSONL -> Llama-3.1 chat format -> packed sequences with an assistant-only loss.

UltraLong's SFT stage uses short chat data only (all samples < 8K tokens, batch 128, LR 5e-6;
arXiv 2504.06214 §3; the paper states neither packing nor a max length). Short conversations are therefore packed into
`seq_length` rows so no compute goes to padding, and each row keeps its conversation boundaries in
`document_ids` (and restarted `position_ids`) so the trainer can block attention across them.

A sample is the same dict of 1-D tensors [seq_length] the pretraining path yields:

    tokens        int64   packed token ids, padded with pad_token_id
    labels        int64   tokens shifted left by one (labels[i] = tokens[i+1]; last = pad)
    loss_mask     float32 1 where labels[i] is an assistant content token or its <|eot_id|>
    position_ids  int64   0.. per conversation (or 0..seq_length-1 with reset_position_ids=False)
    document_ids  int64   0,0,..,1,1,..,k: conversation index in the row; padding is one more id

Order is a function of `seed` only: conversations are shuffled, then packed greedily in that order.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_ultralong.data.samples.chat import ChatFormat, ChatTokenizer, load_tokenizer, validate_messages
from megatron_ultralong.data.samples.config import DataSection

_ENCODE_BATCH = 1024  # conversations per batched tokenizer call: bounds memory, keeps Rust threads busy


@dataclass(frozen=True)
class SFTDataConfig:
    """How conversations are packed beyond what the training config's `data:` section (`DataSection`:
    paths, tokenizer, seq_length, chat_format, overlong, pad_token_id, reset_position_ids) says."""

    date_string: str = "26 Jul 2024"
    """"Today Date" in the llama3.1 system block (the template's default)."""

    pack: bool = True
    """Pack several conversations per row; False gives one conversation per row (padded)."""

    pack_window: int = 16
    """Greedy first-fit over this many most recently opened rows (1 = next-fit). A larger window
    fills rows better and still keeps the shuffled order roughly intact."""

    verify_samples: int = 8
    """Also tokenize the first N conversations as one rendered string and require identical ids
    (guards the per-segment mask against a tokenizer that merges across segments)."""

    def __post_init__(self) -> None:
        if self.pack_window < 1:
            raise ValueError(f"SFTDataConfig.pack_window={self.pack_window}: expected >= 1")
        if self.verify_samples < 0:
            raise ValueError(f"SFTDataConfig.verify_samples={self.verify_samples}: expected >= 0")


def _check_data(data: DataSection) -> None:
    """The DataSection fields SFT reads, checked before any file is opened."""
    if data.kind != "sft":
        raise ValueError(f"data.kind={data.kind!r}: the SFT dataset needs kind 'sft'")
    if data.weights is not None:
        raise ValueError("data.weights is not supported for data.kind=sft: files are concatenated")
    if data.tokenizer is None:
        raise ValueError("data.tokenizer is required for data.kind=sft (it renders the chat format)")
    if data.overlong not in ("truncate", "drop", "error"):
        raise ValueError(f"data.overlong={data.overlong!r}: expected truncate, drop or error")


@dataclass(frozen=True)
class SFTStats:
    """What building the dataset measured (printed by the trainer at start-up)."""

    conversations: int
    """Valid conversations read."""
    truncated: int
    """Conversations cut to seq_length (overlong=truncate)."""
    dropped_overlong: int
    """Conversations dropped for length (overlong=drop)."""
    dropped_no_target: int
    """Truncated conversations whose kept part had no assistant token left (dropped)."""
    rows: int
    """Packed rows (= len(dataset))."""
    tokens: int
    """Non-padding tokens over all rows."""
    loss_tokens: int
    """Tokens that are loss targets (assistant content + <|eot_id|>)."""
    seq_length: int
    """Row capacity."""

    @property
    def fill(self) -> float:
        """Fraction of row capacity holding real tokens (the rest is padding)."""
        return self.tokens / max(1, self.rows * self.seq_length)


def read_chat_jsonl(path: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Yield (where, messages) per non-blank line; ValueError names file and line for bad input."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield where, validate_messages(record, where)


def pack_greedy(lengths: Sequence[int], capacity: int, window: int = 16) -> list[list[int]]:
    """First-fit of items (in the given order) into rows of `capacity`, over the `window` most
    recently opened rows; returns rows as lists of item indices, in the order rows were opened.
    Every length must be <= capacity."""
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # indices into rows, oldest first, at most `window`
    for item, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {item} has length {n} > capacity {capacity}")
        target = next((r for r in open_rows if free[r] >= n), None)
        if target is None:
            target = len(rows)
            rows.append([])
            free.append(capacity)
            open_rows.append(target)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[target].append(item)
        free[target] -= n
    return rows


class SFTDataset(Dataset):
    """Map-style dataset of packed SFT rows; `dataset[i]` is the dict described in the module doc.

    data: the training config's `data:` section (kind "sft"); seed: the conversation shuffle."""

    def __init__(self, data: DataSection, seed: int = 1234, config: SFTDataConfig = SFTDataConfig()):
        _check_data(data)
        self.data, self.config, self.seed = data, config, seed
        chat = ChatTokenizer(load_tokenizer(data.tokenizer), ChatFormat(data.chat_format, config.date_string))
        S = data.seq_length
        ids_list: list[np.ndarray] = []
        flags_list: list[np.ndarray] = []
        truncated = dropped_long = dropped_empty = n_conv = 0
        for batch in _batches(data.paths, _ENCODE_BATCH):
            for where, messages in batch:
                chat.check_content(messages, where)
                if n_conv < config.verify_samples:
                    chat.verify(messages, where)
                n_conv += 1
            for (where, _), (ids, flags) in zip(batch, chat.encode_many([m for _, m in batch])):
                if len(ids) > S:
                    if data.overlong == "error":
                        raise ValueError(f"{where}: {len(ids)} tokens > seq_length={S} (overlong=error)")
                    if data.overlong == "drop":
                        dropped_long += 1
                        continue
                    truncated += 1
                    ids, flags = ids[:S], flags[:S]
                    if not flags[1:].any():  # a target at position 0 is never predicted
                        dropped_empty += 1
                        continue
                ids_list.append(ids)
                flags_list.append(flags)
        if not ids_list:
            raise ValueError(f"{list(data.paths)}: no usable conversation")

        order = list(range(len(ids_list)))
        random.Random(seed).shuffle(order)
        lengths = [len(ids_list[k]) for k in order]
        if config.pack:
            rows = [[order[j] for j in row] for row in pack_greedy(lengths, S, config.pack_window)]
        else:
            rows = [[k] for k in order]

        # Flat storage: one int32 token array and one bool target array, rows as (start, count)
        # runs of conversations; __getitem__ materialises a row.
        self._ids = np.concatenate(ids_list)
        self._flags = np.concatenate(flags_list)
        starts = np.zeros(len(ids_list) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids_list], out=starts[1:])
        self._conv_starts = starts
        self._rows = [np.asarray(row, dtype=np.int64) for row in rows]
        tokens = int(starts[-1])
        self.stats = SFTStats(
            conversations=n_conv,
            truncated=truncated,
            dropped_overlong=dropped_long,
            dropped_no_target=dropped_empty,
            rows=len(rows),
            tokens=tokens,
            loss_tokens=int(sum(f[1:].sum() for f in flags_list)),
            seq_length=S,
        )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"SFT row {i} out of range [0, {len(self)})")
        S, cfg = self.data.seq_length, self.data
        tokens = np.full(S, cfg.pad_token_id, dtype=np.int64)
        target = np.zeros(S, dtype=bool)  # token j is a loss target (predicted from position j-1)
        document_ids = np.empty(S, dtype=np.int64)
        position_ids = np.arange(S, dtype=np.int64)
        at = 0
        for doc, conv in enumerate(self._rows[i]):
            lo, hi = self._conv_starts[conv], self._conv_starts[conv + 1]
            n = int(hi - lo)
            tokens[at : at + n] = self._ids[lo:hi]
            target[at : at + n] = self._flags[lo:hi]
            target[at] = False  # a conversation's first token is never predicted from the previous one
            document_ids[at : at + n] = doc
            if cfg.reset_position_ids:
                position_ids[at : at + n] = np.arange(n)
            at += n
        document_ids[at:] = len(self._rows[i])
        if cfg.reset_position_ids:
            position_ids[at:] = np.arange(S - at)
        labels = np.full(S, cfg.pad_token_id, dtype=np.int64)
        labels[:-1] = tokens[1:]
        loss_mask = np.zeros(S, dtype=np.float32)
        loss_mask[:-1] = target[1:]
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "document_ids": torch.from_numpy(document_ids),
        }


def _batches(paths: Sequence[str], size: int) -> Iterator[list[tuple[str, list[dict[str, str]]]]]:
    batch: list[tuple[str, list[dict[str, str]]]] = []
    for path in paths:
        try:
            for item in read_chat_jsonl(path):
                batch.append(item)
                if len(batch) == size:
                    yield batch
                    batch = []
        except FileNotFoundError:
            raise ValueError(f"SFT data file {path!r} does not exist") from None
    if batch:
        yield batch


def build_sft_dataset(data: DataSection, seed: int, config: SFTDataConfig = SFTDataConfig()) -> SFTDataset:
    """From the training config's `data` section (`DataSection`, kind "sft"). Blend weights are
    refused: SFT files are concatenated (duplicate a file to upsample it)."""
    return SFTDataset(data, seed, config)
