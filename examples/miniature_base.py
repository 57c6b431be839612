"""Pretrain the miniature's base model: a tiny Llama that retrieves facts within L = 64 tokens.

This stands in for Llama-3.1-8B-Instruct, the recipe's *starting point*, so it is not trained by
the project's trainer: it is plain transformers + torch, and its output is an ordinary HF checkpoint
that `mu-convert hf-to-mcore` then takes like any other. The committed copy
(examples/toydata/base_l64/, ~0.6 MB) was made with

    PYTHONPATH=$PWD:$PWD/examples .venv/bin/python examples/miniature_base.py --out examples/toydata/base_l64

(`make demo` uses it; `examples/demo.py --pretrain-base` and examples/miniature.py rebuild it.)

Training: fact-and-recall documents (toydata/facts.py) of 17-64 tokens, packed with the separator
into rows of L tokens (positions 0..L-1, no reset, attention across documents), next-token loss on
every token plus an up-weighted loss on the recall digits -- with the LM loss alone a model this
small had not formed the retrieval skill after 2,500 steps (measured).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from toydata import facts

BASE_LENGTH = 64
"""L: the base model's trained context (its "8K")."""
RECALL_WEIGHT = 8.0
"""Loss weight of each recall digit relative to an ordinary token."""


def model_config(vocab_size: int):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=192, max_position_embeddings=BASE_LENGTH,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=facts.NUM_SPECIAL,
        eos_token_id=2, pad_token_id=1, attn_implementation="sdpa")


def packed_batch(rng: random.Random, tokenizer, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of length+1 tokens cut from a stream of separator-prefixed documents, and the loss
    weight of each target: ids [rows, length + 1], weights [rows, length]."""
    sep = tokenizer.convert_tokens_to_ids("\u2581" + facts.SEPARATOR)
    need = rows * (length + 1)
    stream: list[int] = []
    weight: list[float] = []
    while len(stream) < need:
        doc = facts.make_document(rng, facts.length_for(rng, 2 * facts.FACT_TOKENS + 1, length))
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        assert len(ids) == doc.num_tokens, (doc.text, len(ids))
        w = [1.0] * len(ids)
        for i in range(len(ids) - 1 - facts.FACT_DIGITS, len(ids) - 1):  # the recall's digits
            w[i] = RECALL_WEIGHT
        stream += [sep, *ids]
        weight += [1.0, *w]
    ids = torch.tensor(stream[:need]).view(rows, length + 1)
    weights = torch.tensor(weight[:need]).view(rows, length + 1)[:, 1:]  # weight of each target
    return ids, weights


@torch.no_grad()
def recall_accuracy(model, tokenizer, length: int, n: int = 128, seed: int = 99) -> float:
    """Fraction of held-out rows whose last document's recall digits are all argmax-correct."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        doc = facts.make_document(rng, rng.randint(2 * facts.FACT_TOKENS + 1, length - 1))
        ids = [tokenizer.convert_tokens_to_ids("\u2581" + facts.SEPARATOR)] + \
            tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        pred = model(torch.tensor([ids])).logits[0].argmax(-1)
        digits = slice(len(ids) - 2 - facts.FACT_DIGITS, len(ids) - 2)  # logits predicting the digits
        hits += int(torch.equal(pred[digits], torch.tensor(ids[digits.start + 1: digits.stop + 1])))
    return hits / n


def pretrain(out: str, seed: int = 0, steps: int = 1200, rows: int = 32, lr: float = 3e-3,
             log_every: int = 100) -> float:
    """Train from scratch and save an HF checkpoint (model + tokenizer) to `out`; returns the
    held-out recall accuracy at L."""
    import transformers

    torch.manual_seed(seed)
    tokenizer = facts.save_hf_tokenizer(out)
    model = transformers.LlamaForCausalLM(model_config(len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = random.Random(1000 + seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ids, weights = packed_batch(rng, tokenizer, rows, BASE_LENGTH)
        logits = model(ids[:, :-1]).logits
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [rows, L]
        loss = (nll * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[base] step {step:5d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    accuracy = recall_accuracy(model, tokenizer, BASE_LENGTH)
    model.save_pretrained(out)
    print(f"[base] {out}: recall accuracy at L={BASE_LENGTH}: {accuracy:.3f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    pretrain(args.out, args.seed, args.steps)


if __name__ == "__main__":
    main()
