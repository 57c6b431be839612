"""Samples for training: indexed datasets packed by megatron-core, batches in a resumable order.

Pretraining samples come from megatron-core's own `GPTDataset` / `BlendedMegatronDatasetBuilder`
(document index, sample index and shuffle built by its C++ helpers and cached), with
`create_attention_mask=False` (a dense [s, s] mask is 4 TB at 1M tokens: Megatron-LM #1025).
This module adds what the plugin needs on top: `document_ids` and, optionally, per-document
positions, both derived from the document boundary in ONE place (`add_document_fields`): the
separator's whole id sequence the dataset's PREFIX.dataset.json records (data/dataset_info.py),
or, for a dataset without one, `data.eod_token_id`; and a batch order that is a pure function of (seed, consumed samples), so a resumed run reads exactly
the samples an uninterrupted one would.

Sample schema (every dataset, pretraining or SFT): 1-D tensors of length seq_length
  tokens int64, labels int64, loss_mask float32, position_ids int64, document_ids int64.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ultralong.data.dataset_info import DocumentBoundary, info_path, read_dataset_info
from megatron_ultralong.data.samples.config import DataSection

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Tensor]: ...


# Ids no token in a .bin file can have (token ids are >= 0). GPTDataset masks labels equal to its
# pad id and warns ("pad token id collides") when pad equals eod, so the two must differ even when
# the data has no separator token at all.
_NO_PAD_ID = -1
_NO_EOD_ID = -2


@dataclass(frozen=True)
class _TokenIds:
    """The ids megatron-core's GPTDataset reads from a tokenizer: the document separator (only
    used for its masks, which the plugin builds itself) and a pad id that never occurs in the data
    (the plugin pads nothing through GPTDataset: samples are always full)."""

    eod: int
    vocab_size: Optional[int]
    pad: int = _NO_PAD_ID

    @property
    def unique_identifiers(self) -> dict:
        """Part of megatron-core's dataset cache key."""
        return {"class": "megatron_ultralong._TokenIds", "eod": self.eod, "vocab_size": self.vocab_size}


def document_boundary(data: DataSection) -> Optional[DocumentBoundary]:
    """What separates documents in `data.paths`: each dataset's PREFIX.dataset.json, else
    data.eod_token_id (one closing id) for a dataset without one; None when nothing is known.
    ValueError when blended datasets disagree, or data.eod_token_id contradicts a dataset's file."""
    explicit = DocumentBoundary((data.eod_token_id,), opens=False) if data.eod_token_id is not None else None
    found: dict[DocumentBoundary, str] = {}
    for prefix in data.paths:
        info = read_dataset_info(prefix)
        if info is None:
            if explicit is not None:
                found.setdefault(explicit, "data.eod_token_id")
            continue
        b = info.boundary()
        if explicit is not None and b != explicit:
            raise ValueError(f"data.eod_token_id={data.eod_token_id} contradicts {info_path(prefix)} (separator ids "
                             f"{list(info.separator_ids)}, {info.separator_position}): remove data.eod_token_id")
        if b is not None:
            found.setdefault(b, info_path(prefix))
    if len(found) > 1:
        (b1, w1), (b2, w2) = list(found.items())[:2]
        raise ValueError(f"data.paths mark documents differently: {w1} by ids {list(b1.ids)}, {w2} by ids {list(b2.ids)}")
    if not found:
        if data.document_mask or data.reset_position_ids:
            raise ValueError("data.document_mask / data.reset_position_ids need document boundaries: "
                             f"{info_path(data.paths[0])} does not exist and data.eod_token_id is not set")
        return None
    return next(iter(found))


def document_starts(tokens: Tensor, boundary: DocumentBoundary) -> Tensor:
    """bool [n]: True where a new document starts (never at 0). tokens: int [n]. Matches the whole
    id sequence; an opening marker belongs to the document it starts, a closing one to the one it ends."""
    n, k = tokens.numel(), len(boundary.ids)
    starts = torch.zeros(n, dtype=torch.bool)
    if n < k:
        return starts
    ids = torch.tensor(boundary.ids, dtype=tokens.dtype)
    match = tokens.unfold(0, k, 1).eq(ids).all(1)  # [n - k + 1]: tokens[i:i+k] is the marker
    if boundary.opens:
        starts[: n - k + 1] = match
    else:
        starts[k:] = match[: n - k]
    starts[0] = False
    return starts


def add_document_fields(sample: dict[str, Tensor], boundary: Optional[DocumentBoundary],
                        reset_positions: bool) -> dict[str, Tensor]:
    """Fill `document_ids` from `boundary` and optionally restart `position_ids` at each document.
    Without a boundary the whole sample is one document."""
    tokens = sample["tokens"]
    if boundary is None:
        starts = torch.zeros_like(tokens, dtype=torch.bool)
    else:
        starts = document_starts(tokens, boundary)
    doc = torch.cumsum(starts.long(), 0)
    sample["document_ids"] = doc
    if reset_positions:
        idx = torch.arange(tokens.numel())
        first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
        sample["position_ids"] = idx - first
    return sample


class PretrainDataset:
    """megatron-core GPTDataset (blended) returning the plugin's sample schema."""

    def __init__(self, data: DataSection, num_samples: int, seed: int, vocab_size: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        for prefix in data.paths:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ValueError(f"data.paths: {prefix + ext} does not exist")
        weights = list(data.weights) if data.weights else [1.0] * len(data.paths)
        blend = (list(data.paths), weights) if len(data.paths) > 1 else (list(data.paths), None)
        cache = data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(data.paths[0])), "cache")
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=data.seq_length,
            blend=blend,
            split="100,0,0",
            path_to_cache=cache,
            tokenizer=_TokenIds(eod=data.eod_token_id if data.eod_token_id is not None else _NO_EOD_ID,
                                vocab_size=vocab_size),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            mid_level_dataset_surplus=0.05,
        )
        rank = dist.get_rank() if dist.is_initialized() else 0

        def build():
            return BlendedMegatronDatasetBuilder(
                GPTDataset, [num_samples, 0, 0], lambda: True, config
            ).build()[0]

        # Rank 0 builds and caches the index files first; the others then read the cache.
        if rank == 0:
            self.dataset = build()
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:
            self.dataset = build()
        self.data = data
        self.boundary = document_boundary(data)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        raw = self.dataset[index]
        sample = {
            "tokens": raw["tokens"].long(),
            "labels": raw["labels"].long(),
            "loss_mask": raw["loss_mask"].float(),
            "position_ids": raw["position_ids"].long(),
        }
        return add_document_fields(sample, self.boundary, self.data.reset_position_ids)


def build_sample_dataset(data: DataSection, num_samples: int, seed: int, vocab_size: int) -> SampleDataset:
    """The training samples `data` describes: packed pretraining data or SFT conversations."""
    if data.kind == "pretrain":
        return PretrainDataset(data, num_samples, seed, vocab_size)
    from megatron_ultralong.data.samples.sft import build_sft_dataset

    return build_sft_dataset(data, seed=seed)


class BatchSchedule:
    """Which samples this DP rank reads at each micro-step: a pure function of consumed samples.

    Global sample g = consumed + micro * (mbs * dp) + dp_rank * mbs + i; the dataset's own
    shuffle makes consecutive indices random. Resuming with the saved `consumed` continues the
    exact sequence.
    """

    def __init__(self, dataset: SampleDataset, micro_batch_size: int, dp_size: int, dp_rank: int):
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank

    def micro_batches(self, consumed: int, num_micro: int) -> Iterator[dict[str, Tensor]]:
        """Collated micro-batches ([mbs, s] tensors) for one optimizer step starting at `consumed`."""
        for m in range(num_micro):
            base = consumed + m * self.mbs * self.dp_size + self.dp_rank * self.mbs
            items = [self.dataset[(base + i) % len(self.dataset)] for i in range(self.mbs)]
            yield {k: torch.stack([it[k] for it in items]) for k in SAMPLE_KEYS}


def cu_seqlens_from_document_ids(document_ids: Tensor) -> Tensor:
    """Global document boundaries over the concatenated batch, as Megatron's packed format wants:
    document_ids [b, s] (non-decreasing per row) -> cu_seqlens int32 [n_docs + 1], from 0 to b*s."""
    b, s = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    flat = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([flat, torch.tensor([b * s])]).to(torch.int32)
