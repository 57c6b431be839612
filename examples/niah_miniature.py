"""The UltraLong recipe in miniature, on CPU: retrieve at a short context, extend with YaRN, retrieve longer.

Not part of the tests or `make demo` (it trains for several minutes). Results: docs/evaluation.md.

1. Train a tiny Llama (plain PyTorch loop over transformers' LlamaForCausalLM) from scratch on
   passkey prompts of SHORT_LEN tokens: RULER's noise haystack with a passkey needle at a random
   depth, the loss on the answer digits plus a small LM loss on everything.
2. NIAH at SHORT_LEN and beyond (2x, 4x, 8x) with the trained RoPE: retrieval beyond the trained
   length is expected to break.
3. Switch RoPE to YaRN with factor LONG_LEN / SHORT_LEN (`yarn_for_context_length`), evaluate with
   no training, then continue training briefly at LONG_LEN and evaluate again.
4. Control: the same continued training at LONG_LEN from the same weights with the original RoPE.

    .venv/bin/python examples/niah_miniature.py --out miniature_out

Everything is seeded; on 1 CPU thread it takes roughly 13 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_ultralong.eval import EvalTokenizer, HFBackend, NiahConfig, run_niah
from megatron_ultralong.eval.haystack import NOISE_SENTENCE, Haystack
from megatron_ultralong.eval.niah import make_niah_sample
from megatron_ultralong.rope import yarn_for_context_length

SHORT_LEN, LONG_LEN = 256, 1024
CONFIG = NiahConfig(haystack="noise", value_digits=5, max_new_tokens=6, samples_per_cell=2)
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def build_tokenizer() -> EvalTokenizer:
    """Byte-level BPE on the noise, the templates and digits (one digit per token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([NOISE_SENTENCE * 4, CONFIG.prefix, CONFIG.needle, CONFIG.question, "0123456789"], trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return EvalTokenizer.wrap(hf)


def build_model(vocab: int, rope_scaling: dict | None, max_pos: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        head_dim=24, intermediate_size=256, rope_theta=10000.0, rope_scaling=rope_scaling,
        max_position_embeddings=max_pos, bos_token_id=0, eos_token_id=1, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def batch(tok: EvalTokenizer, hay: Haystack, length: int, size: int, rng: random.Random):
    """Passkey prompts + answer tokens: ids [b, length + a], answer mask [b, length + a - 1]."""
    rows, masks = [], []
    for _ in range(size):
        s = make_niah_sample(tok, hay, CONFIG, length, rng.random(), rng.randrange(1 << 30))
        answer = tok.encode(" " + s.answers[0] + ".")
        ids = list(s.prompt.ids) + answer
        rows.append(ids)
        masks.append([0] * (length - 1) + [1] * len(answer))
    return torch.tensor(rows), torch.tensor(masks, dtype=torch.float)


def train(model, tok, hay, length: int, steps: int, batch_size: int, lr: float, seed: int, log: list,
          phase: str) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        ids, mask = batch(tok, hay, length, batch_size, rng)
        logits = model(ids[:, :-1]).logits
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, s]
        answer_loss = (nll * mask).sum() / mask.sum()
        loss = answer_loss + 0.1 * nll.mean()  # the LM term keeps the noise/template modelled
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            rec = {"phase": phase, "length": length, "step": step, "answer_loss": round(answer_loss.item(), 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            log.append(rec)
            print("[train]", rec, flush=True)
    model.eval()


def niah(model, tok, out_dir: str, name: str, lengths: list[int]) -> dict:
    res = run_niah(HFBackend(model, prefill_chunk=1024), tok, lengths, DEPTHS, os.path.join(out_dir, name),
                   CONFIG, title=f"Miniature: {name}", log=False)
    per_length = {n: sum(res.scores[i][j] for i in range(len(DEPTHS))) / len(DEPTHS) for j, n in enumerate(lengths)}
    print(f"[niah] {name}: mean {res.mean_score:.3f} per length {per_length}", flush=True)
    return {"mean": res.mean_score, "per_length": per_length, "heatmap": res.heatmap_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="miniature_out")
    parser.add_argument("--short-steps", type=int, default=1000)
    parser.add_argument("--long-steps", type=int, default=400)
    parser.add_argument("--no-control", action="store_true", help="skip the plain-RoPE control run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    hay = Haystack(tok, "noise")
    lengths = [SHORT_LEN, 2 * SHORT_LEN, LONG_LEN, 2 * LONG_LEN]
    log: list = []
    results: dict = {"tokenizer_vocab": tok.vocab_size, "train_log": log}

    model = build_model(tok.vocab_size, None, SHORT_LEN)
    train(model, tok, hay, SHORT_LEN, args.short_steps, 16, 2e-3, seed=1, log=log, phase="short")
    results["short_trained"] = niah(model, tok, args.out, "1_short_trained", lengths)

    rope = yarn_for_context_length(LONG_LEN, theta=10000.0, original_max_position_embeddings=SHORT_LEN, beta_fast=4.0)
    _, scaling = rope.to_hf()
    extended = build_model(tok.vocab_size, scaling, LONG_LEN)
    extended.load_state_dict(model.state_dict())
    results["rope_scaling"] = scaling
    results["yarn_no_training"] = niah(extended, tok, args.out, "2_yarn_no_training", lengths)

    train(extended, tok, hay, LONG_LEN, args.long_steps, 4, 1e-3, seed=2, log=log, phase="yarn")
    results["yarn_continued"] = niah(extended, tok, args.out, "3_yarn_continued", lengths)

    # Control: the same continued training at LONG_LEN with the original RoPE (no YaRN), to tell
    # what the RoPE change contributes from what training on long prompts alone does.
    if not args.no_control:
        plain = build_model(tok.vocab_size, None, LONG_LEN)
        plain.load_state_dict(model.state_dict())
        train(plain, tok, hay, LONG_LEN, args.long_steps, 4, 1e-3, seed=2, log=log, phase="plain_rope")
        results["control_plain_rope_continued"] = niah(plain, tok, args.out, "4_control_plain_rope_continued", lengths)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: v for k, v in results.items() if k != "train_log"}, indent=2))


if __name__ == "__main__":
    main()
