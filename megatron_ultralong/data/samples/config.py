"""`DataSection`: where training samples come from (the `data:` section of a training config).

It lives with the sample builders that read it (pretrain.py, sft.py), below training/, which
embeds it in `TrainConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class DataSection:
    """Where samples come from."""

    kind: Literal["pretrain", "sft"] = "pretrain"
    """pretrain: Megatron indexed datasets packed to seq_length; sft: chat JSONL (assistant-only loss)."""

    paths: tuple[str, ...] = ()
    """pretrain: indexed-dataset prefixes (path without .bin/.idx); sft: chat JSONL files."""

    weights: Optional[tuple[float, ...]] = None
    """Blend weights, one per path (default: equal)."""

    seq_length: int = 1024
    """Tokens per sample (1M/2M/4M in the recipe). Must divide by 2 x CP."""

    tokenizer: Optional[str] = None
    """HF tokenizer directory or tokenizer.json (sft: renders the chat template)."""

    eod_token_id: Optional[int] = None
    """Only for datasets without a PREFIX.dataset.json (older builds, megatron's preprocess_data.py):
    the id that ends each document, for the document mask / position reset. mu-build-dataset records
    its separator (any number of ids) and tokenizer in that file, and the trainer reads them."""

    pad_token_id: int = 0
    """Padding id for samples shorter than seq_length (masked out of the loss)."""

    document_mask: bool = False
    """Block attention across documents (the recipe trains WITHOUT it: cross-document attention)."""

    reset_position_ids: bool = False
    """Restart RoPE positions at each document (pretrain: off in the recipe) or at each packed
    conversation (sft: so a conversation sees the positions it would see alone)."""

    cache_dir: Optional[str] = None
    """Where megatron-core caches sample indices (default: next to the first dataset)."""

    chat_format: Literal["llama3.1", "llama3"] = "llama3.1"
    """sft: chat rendering (llama3.1 adds Meta's default system block, as its template does)."""

    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """sft: what to do with a conversation longer than seq_length (counted in the dataset stats)."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("data.paths is empty: give at least one dataset")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths"
            )
        if self.weights is not None and any(w <= 0 for w in self.weights):
            raise ValueError(f"data.weights={list(self.weights)}: every weight must be > 0")
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length}: expected >= 2")
