"""The language-model head and cross entropy, computed a chunk of tokens at a time.

A 1M-token sequence's logits are 1M x 128256 values: 256 KB per token in fp16, 256 GB for the
sequence. GPTModel materialises them whole. Here the output layer and the vocab-parallel cross
entropy run on `chunk_tokens` tokens at a time under activation checkpointing: forward keeps only
the per-token loss, backward recomputes one chunk's logits at a time. Peak logits memory is
chunk_tokens x b x V/TP.

The final RMSNorm runs inside each chunk's checkpoint too (`final_norm`), so forward keeps only the
norm's input, not its output: h*e bytes per local token less (1,024 B at TP 8 with sequence
parallelism for Llama-3.1-8B, 4 GiB at 4M tokens on one node); backward re-runs the norm on one
chunk's rows.

Padded vocabulary rows (Megatron pads V to a multiple of 128 x TP) are masked to -inf, so the
softmax is over the real vocabulary exactly as in HF (zero rows would otherwise add exp(0) terms).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import Tensor
from torch.utils.checkpoint import checkpoint


Norm = Optional[Callable[[Tensor], Tensor]]


def _chunk_loss(hidden: Tensor, weight: Tensor, labels: Tensor, pad_mask: Optional[Tensor], final_norm: Norm = None,
                tp_group=None) -> Tensor:
    """hidden [c, b, H], weight [V/TP, H], labels [c, b] -> per-token loss [c, b] (fp32).

    final_norm: applied to `hidden` first, then (without sequence parallelism) the column-parallel
    copy, so the norm's backward sees the gradient all-reduced over TP, as when it ran before."""
    if final_norm is not None:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(final_norm(hidden), group=tp_group)
    logits = F.linear(hidden, weight).float()  # [c, b, V/TP]
    if pad_mask is not None:
        logits = logits.masked_fill(pad_mask, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def chunked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    vocab_size: int,
    chunk_tokens: int,
    tp_rank: int,
    sequence_parallel: bool,
    tp_group=None,
    final_norm: Norm = None,
) -> Tensor:
    """Per-token cross entropy [b, s] from final hidden states without materialising all logits.

    hidden: [s, b, H] before `final_norm` ([s/TP, b, H] under sequence parallelism); with
        final_norm None, after the final norm.
    final_norm: the model's final RMSNorm, run per chunk inside the chunk's checkpoint.
    weight: this TP rank's output-layer (or tied embedding) rows [V_pad/TP, H].
    labels: [b, s] next-token ids.
    """
    if sequence_parallel and tp_group is not None and tp_group.size() > 1:
        return _sequence_parallel_chunks(hidden, weight, labels, vocab_size, chunk_tokens, tp_rank, tp_group,
                                         final_norm)
    if sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=tp_group)
    elif final_norm is None:
        # Identity forward; all-reduces the input gradient over TP in backward (column-parallel).
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    local_vocab = weight.shape[0]
    start = tp_rank * local_vocab
    pad_mask = None
    if start + local_vocab > vocab_size:
        pad_mask = torch.arange(start, start + local_vocab, device=weight.device) >= vocab_size
    labels = labels.transpose(0, 1).contiguous()  # [s, b]
    seq = hidden.shape[0]
    chunk_rows = max(1, chunk_tokens // max(1, hidden.shape[1]))
    losses = []
    for begin in range(0, seq, chunk_rows):
        end = min(seq, begin + chunk_rows)
        args = (hidden[begin:end], weight, labels[begin:end], pad_mask, final_norm, tp_group)
        if torch.is_grad_enabled() and seq > chunk_rows:
            losses.append(checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            losses.append(_chunk_loss(*args))
    return torch.cat(losses, dim=0).transpose(0, 1).contiguous()  # [b, s]


def _pad_mask(weight: Tensor, vocab_size: int, tp_rank: int) -> Optional[Tensor]:
    local_vocab = weight.shape[0]
    start = tp_rank * local_vocab
    if start + local_vocab <= vocab_size:
        return None
    return torch.arange(start, start + local_vocab, device=weight.device) >= vocab_size


def _gathered_chunk_loss(piece: Tensor, weight: Tensor, labels: Tensor, pad_mask: Optional[Tensor], tp_group,
                         final_norm: Norm = None) -> Tensor:
    """piece [c/TP, b, H] of this rank -> loss [c, b] of the rows the gather yields.

    The norm runs on this rank's rows before the gather, where it ran before (its weight gradient is
    then reduced over TP with the other sequence-parallel norms' by megatron)."""
    if final_norm is not None:
        piece = final_norm(piece)
    hidden = tensor_parallel.gather_from_sequence_parallel_region(piece, group=tp_group)
    return _chunk_loss(hidden, weight, labels, pad_mask)


def _sequence_parallel_chunks(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_size: int, chunk_tokens: int,
                              tp_rank: int, tp_group, final_norm: Norm = None) -> Tensor:
    """Sequence parallelism: gather each chunk over TP inside its checkpoint, never the whole sequence.

    Gathering the whole final hidden state first would keep [s, b, H] (8 KB per token for Llama-3.1-8B
    in bf16) from forward to backward, 8 GiB at 1M tokens per TP group. Here chunk j is the TP
    gather of every rank's j-th slice of its local rows (model/sequence_tiles.py's row order), so
    only this rank's slice is saved and the gathered chunk is re-made in backward; the losses are
    put back in sequence order at the end."""
    from megatron_ultralong.model.sequence_tiles import gathered_rows, sequence_order, tile_bounds

    tp, local, batch = tp_group.size(), hidden.shape[0], hidden.shape[1]
    pad_mask = _pad_mask(weight, vocab_size, tp_rank)
    labels = labels.transpose(0, 1).contiguous()  # [s, b]
    rows_per_piece = max(1, chunk_tokens // max(1, batch) // tp)
    bounds = tile_bounds(local, -(-local // rows_per_piece))
    losses = []
    for start, end in bounds:
        rows = gathered_rows(local, tp, start, end).to(labels.device)
        args = (hidden[start:end], weight, labels.index_select(0, rows), pad_mask, tp_group, final_norm)
        if torch.is_grad_enabled():
            losses.append(checkpoint(_gathered_chunk_loss, *args, use_reentrant=False))
        else:
            losses.append(_gathered_chunk_loss(*args))
    order = sequence_order(local, tp, bounds).to(labels.device)
    return torch.cat(losses, dim=0).index_select(0, order).transpose(0, 1).contiguous()  # [b, s]
