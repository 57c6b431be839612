"""The miniature reproduction: does YaRN + length-upsampled CPT extend retrieval to 4x the trained
length, and what does each ingredient contribute? Results: docs/evaluation.md ("Miniature").

The same pipeline as `make demo` (examples/demo.py): fact-and-recall corpus -> mu-build-dataset ->
the L=64 base -> mu-convert hf-to-mcore -> tools/train.py at 4L=256 with CP=2 -> mu-convert
mcore-to-hf -> NIAH. Arms, all from the same base model:
  a  plain RoPE, no training          b  YaRN x4, no training
  c  YaRN x4 + CPT on upsampled data  d  plain RoPE + the same CPT
  e  YaRN x4 + CPT on short documents only (< L tokens: the upsampling ablation)
  m  arm c with the cross-document attention mask on (the paper trains without it)
  s  arm c at the demo's CPT_STEPS, then the demo's SFT stage (short chat data at L, the toy
     vocabulary + Llama-3's chat tokens; examples/demo.py): evaluated with plain prompts and in its
     chat format (chat_accuracy: "<value> .<|eot_id|>" teacher-forced after the assistant header)
Each CPT arm is evaluated at its checkpoints (--eval-steps) at 1x/2x/4x/8x L with --samples needles
per length, at evenly spaced depths: accuracy by length and by needle distance, and filler loss by
position. Seeds vary the CPT data order and the NIAH prompts (the base model is the shipped one).

Scoring: one batched forward per length; a sample counts as retrieved when the greedy
continuation of "amber is" is exactly the fact's " 4821 ." -- teacher-forced argmax over those six
tokens, which is what greedy decoding of them produces. Prompts are run_niah's (make_niah_sample).

    PYTHONPATH=$PWD:$PWD/examples nice .venv/bin/python examples/miniature.py --out miniature_out

Results are appended to OUT/results.jsonl as they come (the run can be cut short and re-read).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
sys.path.insert(0, REPO)

import demo  # noqa: E402  (the demo's stages: corpus, data recipe, CPT overrides)
from toydata import facts  # noqa: E402

L, TARGET = demo.L, demo.TARGET
LENGTHS = (L, 2 * L, 4 * L, 8 * L)


def convert(*args: str) -> None:
    """mu-convert in this process (same code path as the CLI, without a new interpreter each time)."""
    from megatron_ultralong.convert.cli import main as convert_main

    saved = dict(os.environ)
    try:  # the CLI sets the torch.distributed variables for its one local rank; keep them out of ours
        code = convert_main([*args, "--overwrite", "--no-progress"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if code != 0:
        raise SystemExit(f"mu-convert {' '.join(args)} failed")


def setup(out: str) -> dict:
    """Corpus, the two datasets, the base in both RoPE variants as Megatron checkpoints."""
    import transformers

    corpus, tok_dir = demo.stage_corpus(out)
    up = demo.stage_dataset(out, corpus, tok_dir)
    short_corpus = os.path.join(out, "data", "short.jsonl")
    facts.write_corpus(short_corpus, facts.corpus_records(demo.SOURCE_DOCS * 3, seed=2, lengths=[
        ("web", 2 * facts.FACT_TOKENS + 1, L - 1, 3.0), ("books", L // 2, L - 1, 1.0)]))
    short = os.path.join(out, "data", "short")
    recipe = demo.write_data_recipe(os.path.join(out, "data", "short.yaml"), short_corpus,
                                    os.path.join(tok_dir, "tokenizer.json"), short, total_tokens=120_000,
                                    short_keep_prob=1.0, long_factor=1.0)
    demo.run(demo._tool("tools/build_dataset.py", "--config", recipe, "--no-progress"),
             os.path.join(out, "logs", "dataset_short.log"))
    hf_base = demo.stage_base(out, pretrain=False)
    chat, chat_tok_dir = demo.stage_sft_data(out)
    mcore_yarn = os.path.join(out, "mcore_yarn")
    convert("hf-to-mcore", hf_base, mcore_yarn, "--yarn-target", str(TARGET), "--yarn-original",
            str(L), "--yarn-beta-fast", "4", "--yarn-beta-slow", "1")
    # Plain RoPE does not depend on max_position_embeddings; raising it only lets the trainer take 4L.
    hf_plain = os.path.join(out, "hf_base_plain256")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_base)
    model.config.max_position_embeddings = TARGET
    model.save_pretrained(hf_plain)
    mcore_plain = os.path.join(out, "mcore_plain")
    convert("hf-to-mcore", hf_plain, mcore_plain)
    return dict(tok_dir=tok_dir, chat=chat, chat_tok_dir=chat_tok_dir, upsampled=up, short=short, hf_base=hf_base,
                mcore_yarn=mcore_yarn, mcore_plain=mcore_plain)


@torch.no_grad()
def evaluate(model, tok, samples: int, seed: int) -> dict:
    """NIAH accuracy per length and by needle distance, filler loss by position."""
    from megatron_ultralong.eval.haystack import Haystack
    from megatron_ultralong.eval.niah import make_niah_sample

    model.eval()
    hay = Haystack(tok, "facts", text=facts.haystack_text())
    cfg = facts.niah_config(seed=seed)
    result: dict = {"accuracy": {}, "by_distance": []}
    for length in LENGTHS:
        rows, targets, starts = [], [], []
        for i in range(samples):
            s = make_niah_sample(tok, hay, cfg, length, i / max(1, samples - 1), i)
            target = tok.encode(f" {s.answers[0]} .")
            rows.append(list(s.prompt.ids) + target[:-1])
            targets.append(target)
            starts.append(s.prompt.needles[0].start)
        ids = torch.tensor(rows)
        pred = model(ids).logits[:, length - 1:].argmax(-1)  # [samples, len(target)]
        hits = (pred == torch.tensor(targets)).all(-1).tolist()
        result["accuracy"][length] = sum(hits) / samples
        result["by_distance"] += [[length, length - st, int(h)] for st, h in zip(starts, hits)]
    rng = random.Random(seed + 7)
    sep = tok.hf_tokenizer.convert_tokens_to_ids("\u2581" + facts.SEPARATOR)
    rows = [[sep] + tok.encode(" ".join(facts.MarkovFiller().words(rng, 8 * L - 1))) for _ in range(16)]
    ids = torch.tensor(rows)
    nll = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.transpose(1, 2), ids[:, 1:], reduction="none")
    per_pos = nll.mean(0)
    result["filler_loss_by_position"] = [round(per_pos[i:i + L].mean().item(), 4) for i in range(0, per_pos.numel(), L)]
    return result


@torch.no_grad()
def evaluate_chat(model, chat_tok, samples: int, seed: int) -> dict:
    """NIAH accuracy per length in the SFT chat format: the reply must be exactly " <value> ." then
    <|eot_id|> (teacher-forced argmax, as `evaluate`); prompts are run_niah's with facts.chat_niah_config."""
    from megatron_ultralong.eval.haystack import Haystack
    from megatron_ultralong.eval.niah import make_niah_sample

    model.eval()
    hay = Haystack(chat_tok, "facts", text=facts.haystack_text())
    cfg = facts.chat_niah_config(seed=seed)
    eot = chat_tok.hf_tokenizer.convert_tokens_to_ids(facts.CHAT_CONTROL[3])
    out = {}
    for length in LENGTHS:
        rows, targets = [], []
        for i in range(samples):
            s = make_niah_sample(chat_tok, hay, cfg, length, i / max(1, samples - 1), i)
            target = chat_tok.encode(f" {s.answers[0]} .") + [eot]
            rows.append(list(s.prompt.ids) + target[:-1])
            targets.append(target)
        pred = model(torch.tensor(rows)).logits[:, length - 1:].argmax(-1)
        out[length] = (pred == torch.tensor(targets)).all(-1).float().mean().item()
    return out


def run_sft(out: str, env: dict, seed: int, samples: int, tok, chat_tok) -> None:
    """Arm s: CPT as arm c for demo.CPT_STEPS, then the demo's vocabulary extension and SFT."""
    sub = os.path.join(out, f"sft_seed{seed}")
    shutil.rmtree(sub, ignore_errors=True)
    os.makedirs(os.path.join(sub, "logs"))
    t0 = time.perf_counter()
    cpt_save = os.path.join(sub, "cpt")
    demo.run(demo.torchrun(2, "tools/train.py", *demo.cpt_overrides(env["mcore_yarn"], env["upsampled"], demo.CPT_STEPS,
                                                                   cpt_save, seed=1000 + seed)),
             os.path.join(sub, "logs", "cpt.log"))
    hf_cpt = os.path.join(sub, "hf_cpt")
    convert("mcore-to-hf", os.path.join(cpt_save, f"iter_{demo.CPT_STEPS:07d}", "model"), hf_cpt)
    rec = evaluate(hf_model(hf_cpt), tok, samples, seed)
    record(out, dict(seed=seed, arm="s", step=0, train_seconds=round(time.perf_counter() - t0), **rec))
    mcore_chat = demo.extend_vocabulary(hf_cpt, env["chat_tok_dir"], sub, seed=seed)
    save = os.path.join(sub, "sft")
    demo.run(demo.torchrun(2, "tools/train.py", *demo.sft_overrides(mcore_chat, env["chat"], env["chat_tok_dir"],
                                                                   demo.SFT_STEPS, save, seed=1000 + seed)),
             os.path.join(sub, "logs", "sft.log"))
    hf_sft = os.path.join(sub, "hf_sft")
    convert("mcore-to-hf", os.path.join(save, f"iter_{demo.SFT_STEPS:07d}", "model"), hf_sft)
    model = hf_model(hf_sft)
    rec = evaluate(model, tok, samples, seed)
    rec["chat_accuracy"] = evaluate_chat(model, chat_tok, samples, seed)
    record(out, dict(seed=seed, arm="s", step=demo.SFT_STEPS, train_seconds=round(time.perf_counter() - t0), **rec))


def hf_model(hf_dir: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)


def record(out: str, rec: dict) -> None:
    with open(os.path.join(out, "results.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    acc = " ".join(f"{k}:{v:.2f}" for k, v in rec["accuracy"].items())
    if "chat_accuracy" in rec:
        acc += "  chat " + " ".join(f"{k}:{v:.2f}" for k, v in rec["chat_accuracy"].items())
    print(f"[miniature] seed {rec['seed']} arm {rec['arm']} step {rec['step']:>3}: {acc}  "
          f"filler loss by 64-token block {rec['filler_loss_by_position']}", flush=True)


def run_cpt(out: str, env: dict, arm: str, seed: int, steps: int, eval_steps: list[int], samples: int,
            tok) -> None:
    mcore = env["mcore_plain"] if arm == "d" else env["mcore_yarn"]
    data = env["short"] if arm == "e" else env["upsampled"]
    save = os.path.join(out, f"cpt_{arm}_seed{seed}")
    shutil.rmtree(save, ignore_errors=True)
    os.makedirs(save)
    t0 = time.perf_counter()
    overrides = demo.cpt_overrides(mcore, data, steps, save, document_mask=arm == "m", seed=1000 + seed)
    interval = math.gcd(*[s for s in eval_steps if s <= steps])
    demo.run(demo.torchrun(2, "tools/train.py", *overrides, f"train.save_interval={interval}"),
             os.path.join(out, "logs", f"cpt_{arm}_seed{seed}.log"))
    train_s = time.perf_counter() - t0
    for step in eval_steps:
        if step > steps:
            continue
        ckpt = os.path.join(save, f"iter_{step:07d}", "model")
        hf_dir = os.path.join(save, f"hf_{step}")
        convert("mcore-to-hf", ckpt, hf_dir)
        rec = evaluate(hf_model(hf_dir), tok, samples, seed)
        record(out, dict(seed=seed, arm=arm, step=step, train_seconds=round(train_s), **rec))
        shutil.rmtree(hf_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="miniature_out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="CPT steps per arm and seed")
    parser.add_argument("--long-steps", type=int, default=200, help="CPT steps for --long-seeds")
    parser.add_argument("--long-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--long-arms", default="cd", help="arms that run --long-steps for --long-seeds")
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--samples", type=int, default=96, help="NIAH prompts per length")
    parser.add_argument("--arms", default="cdems", help="CPT arms to run (a, b are always evaluated)")
    parser.add_argument("--mask-seeds", type=int, nargs="*", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"))
    t0 = time.perf_counter()
    env = setup(out)
    from megatron_ultralong.eval.tokenizer import EvalTokenizer

    tok = EvalTokenizer.from_path(env["tok_dir"])
    chat_tok = EvalTokenizer.from_path(env["chat_tok_dir"])
    for seed in args.seeds:
        record(out, dict(seed=seed, arm="a", step=0, **evaluate(hf_model(env["hf_base"]), tok, args.samples, seed)))
        hf_yarn = os.path.join(out, "hf_yarn_untrained")
        if not os.path.exists(hf_yarn):
            convert("mcore-to-hf", env["mcore_yarn"], hf_yarn)
        record(out, dict(seed=seed, arm="b", step=0, **evaluate(hf_model(hf_yarn), tok, args.samples, seed)))
        for arm in args.arms:
            if arm == "m" and seed not in args.mask_seeds:
                continue
            if arm == "s":
                run_sft(out, env, seed, args.samples, tok, chat_tok)
                continue
            steps = args.long_steps if seed in args.long_seeds and arm in args.long_arms else args.steps
            run_cpt(out, env, arm, seed, steps, args.eval_steps, args.samples, tok)
        print(f"[miniature] seed {seed} done at {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"[miniature] all done in {time.perf_counter() - t0:.0f}s; {os.path.join(out, 'results.jsonl')}")


if __name__ == "__main__":
    main()
