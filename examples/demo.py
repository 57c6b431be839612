"""`make demo`: the UltraLong recipe in miniature, end to end, on a CPU in a few minutes.

The same steps as the real recipe (examples/recipes/, docs/), at toy size, each run as its own
process through the project's CLIs exactly as a user would run them (distributed stages under
torchrun with gloo). Every stage prints its command, where its artifact is, and what it measured.

  1 tokenizer   the shipped Llama-3-style toy BPE (examples/data/toy_tokenizer.json, trained on the
                corpus by examples/data/make_tiny_corpus.py; nothing is downloaded) as an HF tokenizer
  2 dataset     examples/data/tiny_corpus.jsonl -> Megatron .bin/.idx with per-domain length
                upsampling and "<s>" separators (tools/build_dataset.py)
  3 hf-model    a tiny random Llama saved as an HF checkpoint, original context 256
  4 convert     HF -> Megatron-Core, RoPE replaced by YaRN for 4x the context (factor 4, beta 4/1),
                logits verified against transformers (tools/convert_checkpoint.py hf-to-mcore)
  5 cpt         continued pretraining at 1024 tokens with context parallelism CP=2 on two
                processes, no cross-document mask (tools/train.py)
  6 sft         short SFT on chat data (assistant-only loss, packed, document mask), CP=2
  7 export      Megatron-Core -> HF with the YaRN rope_scaling in config.json, verified
  8 eval        needle-in-a-haystack grid on the exported model: JSON + heatmap PNG

The model is tiny and briefly trained: the demo shows the pipeline working, not retrieval quality
(examples/niah_miniature.py and docs/evaluation.md report what a longer CPU run learns).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "examples", "data", "tiny_corpus.jsonl")
DATA_RECIPE = os.path.join(REPO, "examples", "data", "tiny_recipe.yaml")
TOKENIZER = os.path.join(REPO, "examples", "data", "toy_tokenizer.json")

ORIGINAL_CONTEXT = 256  # the tiny base model's "8K"
TARGET_CONTEXT = 1024  # its "1M": YaRN factor 4
CPT_STEPS, SFT_STEPS = 30, 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")


def run(cmd: list[str], log_path: str) -> None:
    """Run a stage's command, its output to `log_path`; on failure show the log's tail and stop."""
    printable = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO + "/") else c for c in cmd)
    print(f"  $ {printable}")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = f.readlines()[-30:]
        sys.stderr.write("".join(tail))
        raise SystemExit(f"[demo] stage failed (exit {proc.returncode}); full log: {log_path}")


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", os.path.join(REPO, script), *args]


def _tool(script: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(REPO, script), *args]


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------- stages
def stage_tokenizer(out: str) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=TOKENIZER, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    directory = os.path.join(out, "tokenizer")
    tok.save_pretrained(directory)
    print(f"  -> {directory} (vocab {len(tok)}, Llama-3 split regex and special tokens)")
    return directory


def stage_dataset(out: str, tokenizer_dir: str) -> str:
    prefix = os.path.join(out, "data", "corpus")
    run(_tool("tools/build_dataset.py", "--config", DATA_RECIPE, "--output", prefix, "--overwrite",
              "--no-progress", f"tokenizer.path={os.path.join(tokenizer_dir, 'tokenizer.json')}"),
        os.path.join(out, "logs", "dataset.log"))
    with open(prefix + ".stats.json", encoding="utf-8") as f:
        report = json.load(f)
    source, output = report["input"], report["output"]
    print(f"  -> {prefix}.bin/.idx: {output['documents']} documents, {output['tokens']} tokens after per-domain "
          f"length upsampling (source: {source['documents']} documents, {source['tokens']} tokens), "
          f"{report['timing']['tokenize_tokens_per_s']:.0f} tokens/s; report {prefix}.stats.md, "
          f"histogram {prefix}.lengths.png")
    return prefix


def stage_hf_model(out: str, tokenizer_dir: str) -> str:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=352, max_position_embeddings=ORIGINAL_CONTEXT, rope_theta=10000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    directory = os.path.join(out, "hf_base")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"  -> {directory} ({params / 1e6:.2f}M parameters, GQA 4/2 heads, context {ORIGINAL_CONTEXT})")
    return directory


def stage_convert(out: str, hf_dir: str) -> str:
    mcore = os.path.join(out, "mcore_yarn")
    log = os.path.join(out, "logs", "convert.log")
    run(_tool("tools/convert_checkpoint.py", "hf-to-mcore", hf_dir, mcore, "--tp", "2", "--overwrite",
              "--no-progress", "--rope-yarn-target", str(TARGET_CONTEXT),
              "--yarn-original-max-position", str(ORIGINAL_CONTEXT), "--yarn-beta-fast", "4",
              "--yarn-beta-slow", "1"), log)
    with open(os.path.join(mcore, "config.json"), encoding="utf-8") as f:
        rope = json.load(f)["rope_scaling"]
    print(f"  -> {mcore} (torch_dist, written at TP=2; rope_scaling {rope})")
    return mcore


def _train(out: str, name: str, overrides: list[str]) -> tuple[str, list[dict]]:
    save = os.path.join(out, name)
    log_file = os.path.join(save, "metrics.jsonl")
    os.makedirs(save, exist_ok=True)
    if os.path.exists(log_file):
        os.remove(log_file)
    run(torchrun(2, "tools/train.py", *overrides, f"train.save={save}", f"train.log_file={log_file}"),
        os.path.join(out, "logs", f"{name}.log"))
    with open(os.path.join(save, "latest"), encoding="utf-8") as f:
        latest = os.path.join(save, f.read().strip(), "model")
    return latest, _read_jsonl(log_file)


def _summarise(history: list[dict]) -> str:
    first, last = history[0], history[-1]
    tok_s = sum(h["tokens_per_s"] for h in history[1:]) / max(1, len(history) - 1)
    return (f"loss {first['loss']:.3f} -> {last['loss']:.3f} over {last['step']} steps, "
            f"{tok_s:.0f} tokens/s, peak RSS {max(h['memory_gb'] for h in history):.2f} GiB per process")


def stage_cpt(out: str, mcore: str, data_prefix: str) -> str:
    checkpoint, history = _train(out, "cpt", [
        f"model.config={mcore}", f"model.megatron_checkpoint={mcore}",
        f"data.paths=[{data_prefix}]", f"data.seq_length={TARGET_CONTEXT}",
        "parallel.context_parallel=2", "parallel.cp_comm_type=p2p",
        f"train.steps={CPT_STEPS}", "train.global_batch_size=2", "train.micro_batch_size=1",
        f"train.save_interval={CPT_STEPS // 2}", "optim.lr=2e-3", "optim.warmup_steps=3",
        "optim.decay_style=cosine", "optim.min_lr=2e-4", "train.log_interval=5",
    ])
    print(f"  -> {checkpoint}: {_summarise(history)}")
    return checkpoint


def _write_chats(path: str, n: int = 160) -> str:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            messages = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def stage_sft(out: str, cpt_checkpoint: str, tokenizer_dir: str) -> str:
    chats = _write_chats(os.path.join(out, "sft_chats.jsonl"))
    checkpoint, history = _train(out, "sft", [
        f"model.config={cpt_checkpoint}", f"model.megatron_checkpoint={cpt_checkpoint}",
        "data.kind=sft", f"data.paths=[{chats}]", f"data.tokenizer={tokenizer_dir}",
        "data.chat_format=llama3", "data.seq_length=256", "data.document_mask=true",
        "data.reset_position_ids=true", "parallel.context_parallel=2",
        f"train.steps={SFT_STEPS}", "train.global_batch_size=2", "optim.lr=1e-3", "train.log_interval=4",
    ])
    print(f"  -> {checkpoint}: {_summarise(history)} (loss on assistant tokens only)")
    return checkpoint


def stage_export(out: str, checkpoint: str) -> str:
    hf_dir = os.path.join(out, "hf_final")
    log = os.path.join(out, "logs", "export.log")
    run(_tool("tools/convert_checkpoint.py", "mcore-to-hf", checkpoint, hf_dir, "--overwrite", "--no-progress",
              "--verify"), log)
    with open(log, encoding="utf-8") as f:
        verify = [line.strip() for line in f if "logit" in line.lower()]
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    print(f"  -> {hf_dir}: max_position_embeddings {config['max_position_embeddings']}, rope_scaling "
          f"{config['rope_scaling']}")
    if verify:
        print(f"     verify: {verify[-1]}")
    return hf_dir


def stage_eval(out: str, hf_dir: str) -> str:
    from megatron_ultralong.eval.backends import HFBackend
    from megatron_ultralong.eval.niah import NiahConfig, run_niah
    from megatron_ultralong.eval.tokenizer import EvalTokenizer

    backend = HFBackend.from_pretrained(hf_dir, device="cpu")
    tokenizer = EvalTokenizer.from_path(hf_dir)
    results_dir = os.path.join(out, "eval")
    results = run_niah(backend, tokenizer, lengths=[256, 512, 1024], depths=[0.0, 0.5, 1.0],
                       out_dir=results_dir, config=NiahConfig(samples_per_cell=1), log=False,
                       title="NIAH, demo model (YaRN 256 -> 1024)")
    heatmap = os.path.join(results_dir, "niah_heatmap.png")
    print(f"  -> {heatmap} and {os.path.join(results_dir, 'niah_results.json')}: "
          f"mean accuracy {results.mean_score:.0%} over 3 lengths x 3 depths")
    return heatmap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="directory for every artifact (replaced)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"))
    print(f"[demo] the UltraLong recipe in miniature; artifacts under {out}")
    t0 = time.perf_counter()
    stages = [
        ("tokenizer", "the shipped Llama-3-style tokenizer, as an HF tokenizer"),
        ("dataset", "build the long-context dataset (length upsampling, <s> separators)"),
        ("hf-model", "create a tiny Llama as an HF checkpoint"),
        ("convert", f"convert to Megatron-Core, extend RoPE with YaRN {ORIGINAL_CONTEXT} -> {TARGET_CONTEXT}"),
        ("cpt", f"continued pretraining at {TARGET_CONTEXT} tokens, CP=2 on 2 CPU processes"),
        ("sft", "short SFT on chat data, CP=2"),
        ("export", "export to HF (YaRN in config.json) and verify against transformers"),
        ("eval", "needle-in-a-haystack on the exported model"),
    ]
    done: dict[str, str] = {}
    for i, (name, what) in enumerate(stages, 1):
        t = time.perf_counter()
        print(f"[demo] {i}/{len(stages)} {name}: {what}")
        if name == "tokenizer":
            done[name] = stage_tokenizer(out)
        elif name == "dataset":
            done[name] = stage_dataset(out, done["tokenizer"])
        elif name == "hf-model":
            done[name] = stage_hf_model(out, done["tokenizer"])
        elif name == "convert":
            done[name] = stage_convert(out, done["hf-model"])
        elif name == "cpt":
            done[name] = stage_cpt(out, done["convert"], done["dataset"])
        elif name == "sft":
            done[name] = stage_sft(out, done["cpt"], done["tokenizer"])
        elif name == "export":
            done[name] = stage_export(out, done["sft"])
        else:
            done[name] = stage_eval(out, done["export"])
        print(f"     ({time.perf_counter() - t:.1f}s)")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s. Logs: {os.path.join(out, 'logs')}; "
          f"heatmap: {done['eval']}")


if __name__ == "__main__":
    main()
