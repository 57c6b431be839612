"""`make demo`: the UltraLong recipe in miniature, end to end on a CPU, showing that it works.

A tiny Llama that can retrieve a fact within its trained context L = 64 tokens is extended to 4L =
256 the UltraLong way (YaRN, then a short continued pretraining on length-upsampled documents packed
with separators, cross-document attention, context parallelism), and a needle-in-a-haystack grid
shows retrieval before and after: red beyond L for the base model, green at 4L after CPT.

Every step runs through the project's own CLIs, each as its own process, as a user would run them:

  1 corpus      synthetic fact-and-recall documents (examples/toydata/facts.py), two domains
  2 dataset     -> Megatron .bin/.idx with per-domain length upsampling and "<s>" separators
                (tools/build_dataset.py = mu-build-dataset)
  3 base        the base model at L: examples/toydata/base_l64 (HF checkpoint, 0.6 MB, made by
                examples/miniature_base.py; --pretrain-base rebuilds it here, ~4 CPU-minutes)
  4 convert     HF -> Megatron-Core with YaRN for 4L (factor 4, beta_fast 4, beta_slow 1), TP=2,
                logits checked against transformers (tools/convert_checkpoint.py hf-to-mcore --verify)
  5 cpt         continued pretraining at 4L with CP=2 on two gloo processes, no document mask,
                no position reset (tools/train.py under torchrun)
  6 export      Megatron-Core -> HF with YaRN in config.json, logits verified (mcore-to-hf --verify)
  7 niah        NIAH grid (1x, 2x, 4x, 8x L; 5 depths) for the base model, YaRN untrained, and
                YaRN + CPT: heatmaps, a side-by-side figure, and the table printed below

The base model is shipped rather than trained here because the recipe starts from a released model
(Llama-3.1-8B-Instruct) and because pretraining it takes longer than the whole demo on a shared
2-core machine; the demo exits non-zero if YaRN + CPT retrieves less than ACCURACY_FLOOR at 4L.
There is no SFT stage: the toy task has no chat data (docs/evaluation.md, "Miniature").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
sys.path.insert(0, REPO)

BASE_CHECKPOINT = os.path.join(REPO, "examples", "toydata", "base_l64")
L = 64  # the base model's trained context (its "8K")
TARGET = 4 * L  # its "1M": YaRN factor 4
LENGTHS = (L, 2 * L, 4 * L, 8 * L)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SAMPLES_PER_CELL = 8
CPT_STEPS = 25
"""Where YaRN + upsampled CPT is at its best at 4L in this toy (0.91 mean over 3 seeds); with more
steps it erodes (0.76 at 100), see docs/evaluation.md, "Miniature reproduction"."""
ACCURACY_FLOOR = 0.75
"""Minimum NIAH accuracy at 4L after CPT (measured 0.90 with these seeds; see docs/evaluation.md)."""

# Two domains like a real mix: "web" mostly short, "books" with long documents (tokens per document).
DOMAINS = (("web", 2 * 8 + 1, 2 * L, 3.0), ("books", L, TARGET, 1.0))
SOURCE_DOCS = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    path = os.pathsep.join([REPO, os.path.join(REPO, "examples"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)


def run(cmd: list[str], log_path: str) -> str:
    """Run a stage's command, its output to `log_path`; on failure show the log's tail and stop."""
    printable = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO + "/") else c for c in cmd)
    print(f"  $ {printable}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    with open(log_path, encoding="utf-8") as f:
        text = f.read()
    if proc.returncode != 0:
        sys.stderr.write("".join(text.splitlines(keepends=True)[-30:]))
        raise SystemExit(f"[demo] stage failed (exit {proc.returncode}); full log: {log_path}")
    return text


def _tool(script: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, script), *args]


def _verify_line(log_text: str) -> str:
    lines = [ln.strip() for ln in log_text.splitlines() if "logit" in ln.lower()]
    return lines[-1] if lines else "(no verify line in the log)"


# ----------------------------------------------------------------------------------------- stages
def stage_corpus(out: str) -> tuple[str, str]:
    from toydata import facts

    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    tok_dir = os.path.join(out, "tokenizer")
    facts.save_hf_tokenizer(tok_dir)
    corpus = os.path.join(data, "facts.jsonl")
    n = facts.write_corpus(corpus, facts.corpus_records(SOURCE_DOCS, seed=1, lengths=DOMAINS))
    example = facts.make_document(__import__("random").Random(0), 30)
    print(f"  -> {corpus}: {n} documents, domains {[d[0] for d in DOMAINS]}; e.g. {example.text!r}")
    return corpus, tok_dir


def write_data_recipe(path: str, corpus: str, tokenizer_json: str, prefix: str, total_tokens: int,
                      short_keep_prob: float = 0.3, long_factor: float = 3.0) -> str:
    """mu-build-dataset recipe: documents < L kept with weight `short_keep_prob`, >= 2L weighted
    `long_factor`, per domain, "<s>" before every document."""
    recipe = {
        "inputs": [corpus], "text_field": "text", "domain_field": "domain",
        "tokenizer": {"path": tokenizer_json, "kind": "hf", "fast_path": "off"},
        "separator": {"text": "<s>", "position": "prefix"},
        "upsampling": {"seed": 1234, "total_tokens": total_tokens, "short_threshold": L,
                       "long_threshold": 2 * L, "short_keep_prob": short_keep_prob,
                       "long_factor": long_factor, "domains": {d[0]: {} for d in DOMAINS}},
        "output": {"prefix": prefix, "length_buckets": [L, 2 * L, TARGET], "overwrite": True},
        "workers": 0,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(recipe, f, indent=2)
    return path


def stage_dataset(out: str, corpus: str, tok_dir: str) -> tuple[str, int]:
    prefix = os.path.join(out, "data", "upsampled")
    recipe = write_data_recipe(os.path.join(out, "data", "recipe.yaml"), corpus,
                               os.path.join(tok_dir, "tokenizer.json"), prefix, total_tokens=120_000)
    run(_tool("tools/build_dataset.py", "--config", recipe, "--no-progress"), os.path.join(out, "logs", "dataset.log"))
    with open(prefix + ".stats.json", encoding="utf-8") as f:
        report = json.load(f)
    source, output = report["input"], report["output"]
    print(f"  -> {prefix}.bin/.idx: {output['documents']} documents, {output['tokens']} tokens after "
          f"upsampling (source {source['documents']} documents, {source['tokens']} tokens); report "
          f"{prefix}.stats.md")
    from transformers import AutoTokenizer

    sep_id = AutoTokenizer.from_pretrained(tok_dir).convert_tokens_to_ids("\u2581<s>")
    return prefix, sep_id


def stage_base(out: str, pretrain: bool) -> str:
    directory = os.path.join(out, "hf_base")
    if pretrain:
        run(_tool("examples/miniature_base.py", "--out", directory), os.path.join(out, "logs", "base.log"))
    else:
        shutil.copytree(BASE_CHECKPOINT, directory)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    print(f"  -> {directory}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"{cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}, trained at L={cfg['max_position_embeddings']}")
    return directory


def stage_convert(out: str, hf_dir: str) -> str:
    mcore = os.path.join(out, "mcore_yarn")
    text = run(_tool("tools/convert_checkpoint.py", "hf-to-mcore", hf_dir, mcore, "--tp", "2", "--overwrite",
                     "--no-progress", "--rope-yarn-target", str(TARGET), "--yarn-original-max-position", str(L),
                     "--yarn-beta-fast", "4", "--yarn-beta-slow", "1", "--verify"),
               os.path.join(out, "logs", "convert.log"))
    with open(os.path.join(mcore, "config.json"), encoding="utf-8") as f:
        rope = json.load(f)["rope_scaling"]
    print(f"  -> {mcore} (torch_dist, TP=2): rope_scaling {rope}\n     verify: {_verify_line(text)}")
    return mcore


def cpt_overrides(mcore: str, data_prefix: str, sep_id: int, steps: int, save: str,
                  document_mask: bool = False, seed: int = 1234) -> list[str]:
    """tools/train.py overrides for the miniature's CPT (shared with examples/miniature.py)."""
    return [
        f"model.config={mcore}", f"model.megatron_checkpoint={mcore}",
        f"data.paths=[{data_prefix}]", f"data.seq_length={TARGET}", f"data.eod_token_id={sep_id}",
        f"data.document_mask={str(document_mask).lower()}", "data.reset_position_ids=false",
        "parallel.context_parallel=2", "parallel.cp_comm_type=p2p",
        f"train.steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=1",
        f"train.seed={seed}", "optim.lr=3e-4", "optim.min_lr=3e-4", "optim.warmup_steps=0",
        "optim.decay_style=constant", "optim.weight_decay=0.0", "train.log_interval=5",
        "train.device=cpu", f"train.save={save}", f"train.log_file={os.path.join(save, 'metrics.jsonl')}",
    ]


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", os.path.join(REPO, script), *args]


def stage_cpt(out: str, mcore: str, data_prefix: str, sep_id: int) -> str:
    save = os.path.join(out, "cpt")
    os.makedirs(save, exist_ok=True)
    run(torchrun(2, "tools/train.py", *cpt_overrides(mcore, data_prefix, sep_id, CPT_STEPS, save)),
        os.path.join(out, "logs", "cpt.log"))
    with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as f:
        history = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(save, "latest"), encoding="utf-8") as f:
        checkpoint = os.path.join(save, f.read().strip(), "model")
    print(f"  -> {checkpoint}: loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} over "
          f"{history[-1]['step']} steps of 8 x {TARGET} tokens")
    return checkpoint


def stage_export(out: str, checkpoint: str) -> str:
    hf_dir = os.path.join(out, "hf_cpt")
    text = run(_tool("tools/convert_checkpoint.py", "mcore-to-hf", checkpoint, hf_dir, "--overwrite",
                     "--no-progress", "--verify"), os.path.join(out, "logs", "export.log"))
    shutil.copy(os.path.join(out, "tokenizer", "tokenizer.json"), hf_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # transformers 5 writes no special_tokens_map
        if os.path.exists(os.path.join(out, "tokenizer", name)):
            shutil.copy(os.path.join(out, "tokenizer", name), hf_dir)
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    print(f"  -> {hf_dir}: max_position_embeddings {cfg['max_position_embeddings']}, rope_scaling "
          f"{cfg['rope_scaling']}\n     verify: {_verify_line(text)}")
    return hf_dir


def yarn_untrained(hf_base: str):
    """The base model with its RoPE replaced by the converter's YaRN (the project's rope module),
    no training: what conversion alone gives."""
    import transformers

    from megatron_ultralong.model.config import extend_context, load_model_config

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, local_files_only=True)
    # The converter's own config math (extend_context -> to_hf), read by transformers 4.x and 5.x alike.
    extended_cfg = extend_context(load_model_config(hf_base), TARGET, L, 4.0, 1.0)
    cfg = transformers.LlamaConfig(**extended_cfg.to_hf(str(model.dtype).removeprefix("torch.")))
    extended = transformers.LlamaForCausalLM(cfg)
    extended.load_state_dict(model.state_dict())
    return extended.eval()


def niah(model, tokenizer_dir: str, out_dir: str, title: str, samples: int = SAMPLES_PER_CELL,
         lengths=LENGTHS, depths=DEPTHS, seed: int = 0):
    """run_niah on the toy task (facts haystack and needle); returns NiahResults."""
    from toydata import facts

    from megatron_ultralong.eval.backends import HFBackend
    from megatron_ultralong.eval.haystack import Haystack
    from megatron_ultralong.eval.niah import run_niah
    from megatron_ultralong.eval.tokenizer import EvalTokenizer

    tok = EvalTokenizer.from_path(tokenizer_dir)
    hay = Haystack(tok, "facts", text=facts.haystack_text())
    return run_niah(HFBackend(model, prefill_chunk=1024), tok, lengths, depths, out_dir,
                    facts.niah_config(samples, seed=seed), title=title, log=False, haystack=hay)


def per_length(results) -> list[float]:
    return [sum(row[j] for row in results.scores) / len(results.scores) for j in range(len(results.lengths))]


def side_by_side(path: str, panels: list[tuple[str, object]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True)
    for ax, (title, res) in zip(axes, panels):
        ax.imshow(res.scores, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(res.lengths)), [f"{n}\n({n // L}x)" for n in res.lengths])
        ax.set_yticks(range(len(res.depths)), [f"{100 * d:.0f}%" for d in res.depths])
        for i, row in enumerate(res.scores):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.axvline(0.5, color="black", linewidth=1, linestyle="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("context length (tokens)")
    axes[0].set_ylabel("needle depth")
    fig.suptitle(f"NIAH before and after: L={L} base, YaRN x4, YaRN + {CPT_STEPS} CPT steps at {TARGET}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_niah(out: str, hf_base: str, hf_cpt: str, tok_dir: str) -> float:
    import torch
    import transformers

    torch.set_num_threads(1)
    eval_dir = os.path.join(out, "eval")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, local_files_only=True).eval()
    cpt = transformers.AutoModelForCausalLM.from_pretrained(hf_cpt, local_files_only=True).eval()
    panels = [
        ("base model (RoPE, trained at L)", niah(base, tok_dir, os.path.join(eval_dir, "1_base"), "Base (RoPE, L=64)")),
        ("YaRN x4, no training", niah(yarn_untrained(hf_base), tok_dir, os.path.join(eval_dir, "2_yarn"), "YaRN x4, untrained")),
        (f"YaRN x4 + CPT ({CPT_STEPS} steps)", niah(cpt, tok_dir, os.path.join(eval_dir, "3_yarn_cpt"), "YaRN x4 + CPT")),
    ]
    figure = side_by_side(os.path.join(eval_dir, "niah_before_after.png"), panels)
    n = SAMPLES_PER_CELL * len(DEPTHS)
    print(f"  NIAH accuracy by context length ({n} prompts per length, needle at 5 depths):")
    print("    " + f"{'model':<32}" + "".join(f"{f'{x} ({x // L}x)':>12}" for x in LENGTHS))
    for title, res in panels:
        print("    " + f"{title:<32}" + "".join(f"{v:>12.2f}" for v in per_length(res)))
    summary = {title: {"per_length": dict(zip(LENGTHS, per_length(res))), "scores": res.scores} for title, res in panels}
    with open(os.path.join(eval_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"  -> {figure} (heatmaps per model under {eval_dir}/*/niah_heatmap.png)")
    return per_length(panels[2][1])[LENGTHS.index(TARGET)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for every artifact (replaced)")
    parser.add_argument("--pretrain-base", action="store_true",
                        help="pretrain the base model here instead of using examples/toydata/base_l64")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"))
    print(f"[demo] the UltraLong recipe in miniature: extend a tiny Llama from L={L} to 4L={TARGET} tokens; "
          f"artifacts under {out}", flush=True)
    t0 = time.perf_counter()

    def step(i: int, name: str, what: str):
        print(f"[demo] {i}/7 {name}: {what}", flush=True)
        return time.perf_counter()

    t = step(1, "corpus", "synthetic fact-and-recall documents (Markov filler, one fact, its recall at the end)")
    corpus, tok_dir = stage_corpus(out)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    t = step(2, "dataset", "mu-build-dataset: per-domain length upsampling, <s> separators")
    prefix, sep_id = stage_dataset(out, corpus, tok_dir)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    t = step(3, "base", "the base model, trained at L" + (" (pretraining it now)" if args.pretrain_base else ""))
    hf_base = stage_base(out, args.pretrain_base)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    t = step(4, "convert", f"mu-convert hf-to-mcore, RoPE -> YaRN {L} -> {TARGET}")
    mcore = stage_convert(out, hf_base)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    t = step(5, "cpt", f"continued pretraining at {TARGET} tokens, CP=2 on 2 CPU processes (tools/train.py)")
    checkpoint = stage_cpt(out, mcore, prefix, sep_id)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    t = step(6, "export", "mu-convert mcore-to-hf --verify")
    hf_cpt = stage_export(out, checkpoint)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    t = step(7, "niah", "needle in a haystack: base, YaRN untrained, YaRN + CPT")
    accuracy = stage_niah(out, hf_base, hf_cpt, tok_dir)
    print(f"     ({time.perf_counter() - t:.1f}s)")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s. YaRN + CPT at 4L={TARGET}: {accuracy:.2f} "
          f"(floor {ACCURACY_FLOOR}). Logs: {os.path.join(out, 'logs')}")
    if accuracy < ACCURACY_FLOOR:
        raise SystemExit(f"[demo] FAILED: NIAH accuracy at {TARGET} after CPT is {accuracy:.2f} < {ACCURACY_FLOOR}")


if __name__ == "__main__":
    main()
