"""Loss by position on long documents: the fast check that context extension worked.

If a model uses its long context, the next-token loss keeps falling (or stays flat) with position;
a model that fails past its trained length shows the loss jumping up at that position. Per-token
NLLs of each document are averaged within position buckets and across documents (every bucket
sees the same documents, so buckets are comparable).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from megatron_ultralong.eval.backends import Backend
from megatron_ultralong.eval.report import save_line_plot, write_json


def bucket_edges(seq_len: int, num_buckets: int, log_spaced: bool = False) -> list[int]:
    """num_buckets + 1 increasing edges over predicted positions [0, seq_len - 1].

    Linear by default; log-spaced (doubling from 1) shows short and long positions alike on a 1M
    document, where a linear bucket would average the first 60K tokens into one point.
    """
    n = seq_len - 1  # predicted positions
    if num_buckets < 1 or n < num_buckets:
        raise ValueError(f"--buckets {num_buckets}: expected between 1 and seq_len - 1 = {n}")
    if not log_spaced:
        return [round(i * n / num_buckets) for i in range(num_buckets + 1)]
    edges = sorted({0} | {min(n, round(math.exp(i * math.log(n) / num_buckets))) for i in range(num_buckets + 1)})
    if edges[-1] != n:
        edges.append(n)
    return edges


def loss_by_position(
    backend: Backend,
    documents: Sequence[Sequence[int]],
    seq_len: int,
    num_buckets: int = 8,
    log_spaced: bool = False,
    out_dir: Optional[str] = None,
    label: str = "model",
) -> dict:
    """Mean NLL and perplexity per position bucket over the first seq_len tokens of each document.

    documents: token id lists, each with >= seq_len tokens (shorter ones are an error: they would
    bias the late buckets towards the longer documents). Returns {"edges", "mean_loss",
    "perplexity", "tokens", ...}; writes ppl_by_position.json/.png to out_dir (writer rank only).
    Position p means "predicting token p + 1 from tokens 0..p".
    """
    if not documents:
        raise ValueError("no documents to evaluate")
    short = [i for i, d in enumerate(documents) if len(d) < seq_len]
    if short:
        raise ValueError(f"documents {short[:5]} have fewer than --seq-len {seq_len} tokens")
    edges = bucket_edges(seq_len, num_buckets, log_spaced)
    total = torch.zeros(len(edges) - 1, dtype=torch.float64)
    count = torch.zeros(len(edges) - 1, dtype=torch.long)
    for doc in documents:
        losses = backend.token_losses(list(doc[:seq_len])).double()  # [seq_len - 1]
        for b in range(len(edges) - 1):
            part = losses[edges[b] : edges[b + 1]]
            total[b] += part.sum()
            count[b] += part.numel()
    mean = (total / count.clamp(min=1)).tolist()
    result = {
        "label": label,
        "seq_len": seq_len,
        "documents": len(documents),
        "edges": edges,
        "tokens": count.tolist(),
        "mean_loss": mean,
        "perplexity": [math.exp(x) for x in mean],
        "overall_loss": float(total.sum() / count.sum()),
    }
    if out_dir is not None and backend.is_writer:
        result["json_path"] = write_json(os.path.join(out_dir, "ppl_by_position.json"), result)
        mids = [(edges[b] + edges[b + 1]) / 2 for b in range(len(edges) - 1)]
        result["plot_path"] = save_line_plot(
            os.path.join(out_dir, "ppl_by_position.png"), {label: (mids, mean)},
            "Position (bucket centre)", "Mean next-token loss (nats)", f"Loss by position ({label})")
    return result
