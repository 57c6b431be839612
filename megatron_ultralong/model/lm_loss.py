"""The language-model head and cross entropy, computed a chunk of tokens at a time.

A 1M-token sequence's logits are 1M x 128256 values: 256 KB per token in fp16, 256 GB for the
sequence. GPTModel materialises them whole. Here the output layer and the vocab-parallel cross
entropy run on `chunk_tokens` tokens at a time under activation checkpointing: forward keeps only
the per-token loss, backward recomputes one chunk's logits at a time. Peak logits memory is
chunk_tokens x b x V/TP.

Padded vocabulary rows (Megatron pads V to a multiple of 128 x TP) are masked to -inf, so the
softmax is over the real vocabulary exactly as in HF (zero rows would otherwise add exp(0) terms).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_loss(hidden: Tensor, weight: Tensor, labels: Tensor, pad_mask: Optional[Tensor]) -> Tensor:
    """hidden [c, b, H], weight [V/TP, H], labels [c, b] -> per-token loss [c, b] (fp32)."""
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
) -> Tensor:
    """Per-token cross entropy [b, s] from final hidden states without materialising all logits.

    hidden: [s, b, H] after the final norm ([s/TP, b, H] under sequence parallelism).
    weight: this TP rank's output-layer (or tied embedding) rows [V_pad/TP, H].
    labels: [b, s] next-token ids.
    """
    if sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=tp_group)
    else:
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
        args = (hidden[begin:end], weight, labels[begin:end], pad_mask)
        if torch.is_grad_enabled() and seq > chunk_rows:
            losses.append(checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            losses.append(_chunk_loss(*args))
    return torch.cat(losses, dim=0).transpose(0, 1).contiguous()  # [b, s]
