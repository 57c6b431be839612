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
  7 sft data    short chat conversations (<= L tokens: a context holding one or two facts, "what is
                KEY ?", the reply "KEY is 4821 .") in ShareGPT layout -> mu-prepare-sft; the toy
                vocabulary gains Llama-3's chat tokens and the CPT model their embedding rows
                (the real base has them), converted back with --verify
  8 sft         a short SFT at L in the Llama-3 chat format, assistant-only loss, packed rows with
                the document mask and position reset (tools/train.py data.kind=sft)
  9 export      the SFT model -> HF, logits verified
 10 niah        NIAH grid (1x, 2x, 4x, 8x L; 5 depths) for the base model, YaRN untrained, YaRN +
                CPT and + SFT: heatmaps, a side-by-side figure, the table printed below; then the
                SFT model is asked in its chat format at 4L and one generated answer is printed

The base model is shipped rather than trained here because the recipe starts from a released model
(Llama-3.1-8B-Instruct) and because pretraining it takes longer than the whole demo on a shared
2-core machine. The demo exits non-zero if NIAH accuracy at 4L is below ACCURACY_FLOOR after CPT
or below SFT_ACCURACY_FLOOR after SFT (the short SFT must keep the long context).
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
from typing import Callable

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

SFT_STEPS = 40
"""A short SFT (the paper's third stage) at L on chat-format data: a few dozen steps."""
SFT_LR = 1e-4
SFT_BATCH = 16
"""Rows of L tokens per SFT step (each holds one or two conversations)."""
SFT_CONVERSATIONS = 1000
CHAT_OVERHEAD = 19
"""Tokens of a one-question conversation besides the user's context (headers, question, reply)."""
SFT_ACCURACY_FLOOR = 0.8
"""Minimum NIAH accuracy at 4L after SFT: the short SFT must keep the long context."""
CHAT_PROMPTS = 10
"""Questions at 4L asked in the chat format after SFT (printed, with one full answer)."""

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


def stage_dataset(out: str, corpus: str, tok_dir: str) -> str:
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
    with open(prefix + ".dataset.json", encoding="utf-8") as f:
        info = json.load(f)
    print(f"     {prefix}.dataset.json: separator {info['separator']['text']!r} = ids {info['separator']['ids']} "
          f"({info['separator']['position']}), tokenizer vocab {info['tokenizer']['vocab_size']}: the trainer "
          "reads these, no id is copied into its config")
    return prefix


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
                     "--no-progress", "--yarn-target", str(TARGET), "--yarn-original", str(L),
                     "--yarn-beta-fast", "4", "--yarn-beta-slow", "1", "--verify"),
               os.path.join(out, "logs", "convert.log"))
    with open(os.path.join(mcore, "config.json"), encoding="utf-8") as f:
        rope = json.load(f)["rope_scaling"]
    print(f"  -> {mcore} (torch_dist, TP=2): rope_scaling {rope}\n     verify: {_verify_line(text)}")
    return mcore


def cpt_overrides(mcore: str, data_prefix: str, steps: int, save: str,
                  document_mask: bool = False, seed: int = 1234) -> list[str]:
    """tools/train.py overrides for the miniature's CPT (shared with examples/miniature.py). The
    document separator comes from the dataset's own PREFIX.dataset.json."""
    return [
        f"model.config={mcore}", f"model.megatron_checkpoint={mcore}",
        f"data.paths=[{data_prefix}]", f"data.seq_length={TARGET}",
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


def train(out: str, stage: str, overrides: Callable[[str], list[str]]) -> tuple[str, list[dict]]:
    """Run tools/train.py on 2 processes into out/<stage>: (its last checkpoint's model dir, its
    metrics history)."""
    save = os.path.join(out, stage)
    os.makedirs(save, exist_ok=True)
    run(torchrun(2, "tools/train.py", *overrides(save)), os.path.join(out, "logs", f"{stage}.log"))
    with open(os.path.join(save, "metrics.jsonl"), encoding="utf-8") as f:
        history = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(save, "latest"), encoding="utf-8") as f:
        return os.path.join(save, f.read().strip(), "model"), history


def stage_cpt(out: str, mcore: str, data_prefix: str) -> str:
    checkpoint, history = train(out, "cpt", lambda save: cpt_overrides(mcore, data_prefix, CPT_STEPS, save))
    print(f"  -> {checkpoint}: loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} over "
          f"{history[-1]['step']} steps of 8 x {TARGET} tokens")
    return checkpoint


def stage_export(out: str, checkpoint: str, name: str, tok_dir: str) -> str:
    hf_dir = os.path.join(out, name)
    text = run(_tool("tools/convert_checkpoint.py", "mcore-to-hf", checkpoint, hf_dir, "--overwrite",
                     "--no-progress", "--verify"), os.path.join(out, "logs", f"export_{name}.log"))
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # transformers 5 writes no special_tokens_map
        if os.path.exists(os.path.join(tok_dir, file)):
            shutil.copy(os.path.join(tok_dir, file), hf_dir)
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    print(f"  -> {hf_dir}: max_position_embeddings {cfg['max_position_embeddings']}, rope_scaling "
          f"{cfg['rope_scaling']}\n     verify: {_verify_line(text)}")
    return hf_dir


def stage_sft_data(out: str) -> tuple[str, str]:
    """Short chat data for the toy task, in ShareGPT layout, through mu-prepare-sft; and the chat
    tokenizer (the toy vocabulary + Llama-3's chat tokens, examples/toydata/facts.py)."""
    from toydata import facts

    raw = os.path.join(out, "data", "chat_sharegpt.jsonl")
    facts.write_corpus(raw, facts.chat_records(SFT_CONVERSATIONS, seed=3, max_context_tokens=L - CHAT_OVERHEAD))
    chat = os.path.join(out, "data", "chat_sft.jsonl")
    run([sys.executable, "-m", "megatron_ultralong.data.samples.chat_convert", raw, chat],
        os.path.join(out, "logs", "prepare_sft.log"))
    tok_dir = os.path.join(out, "tokenizer_chat")
    facts.save_hf_chat_tokenizer(tok_dir)
    with open(chat, encoding="utf-8") as f:
        first = json.loads(f.readline())["messages"]
    print(f"  -> {chat}: {SFT_CONVERSATIONS} conversations of <= {L} tokens, e.g. user {first[0]['content'][-40:]!r}"
          f" -> assistant {first[1]['content']!r}")
    return chat, tok_dir


def extend_vocabulary(hf_cpt: str, chat_tok_dir: str, out: str, seed: int = 0) -> str:
    """The CPT model with embedding and output rows for the chat tokens, as an HF checkpoint -> Megatron.

    The recipe's base (Llama-3.1-8B-Instruct) already has its chat tokens; the toy's word-level
    vocabulary does not, so they are appended (ids 65..) and their rows start at the mean of the
    trained rows (transformers' `resize_token_embeddings`, mean_resizing), <|eot_id|>'s output row
    and <|begin_of_text|>'s input row at the separator's. Every other weight is the CPT model's."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_cpt, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(chat_tok_dir, local_files_only=True)
    before = model.config.vocab_size
    torch.manual_seed(seed)  # the new rows are drawn around the old rows' mean: the same draw every run
    model.resize_token_embeddings(len(tok))
    # <|eot_id|>'s output row starts as the separator's: the model then predicts the end of a turn
    # where it predicts the end of a document, and SFT only has to prefer it there. Its input row stays
    # at the mean: as an input "<s>" would announce a new, unrelated document after the user's turn.
    # <|begin_of_text|>'s input row is the separator's: every training document and NIAH prompt starts
    # with "<s>", which the model attends to from everywhere (its attention sink); a conversation then
    # starts the same way instead of with an untrained token.
    from toydata import facts

    sep = tok.convert_tokens_to_ids("\u2581" + facts.SEPARATOR)
    with torch.no_grad():
        eot, bos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|begin_of_text|>")
        model.get_output_embeddings().weight[eot] = model.get_output_embeddings().weight[sep]
        model.get_input_embeddings().weight[bos] = model.get_input_embeddings().weight[sep]
    hf_chat = os.path.join(out, "hf_cpt_chat")
    model.save_pretrained(hf_chat)
    tok.save_pretrained(hf_chat)
    mcore = os.path.join(out, "mcore_cpt_chat")
    text = run(_tool("tools/convert_checkpoint.py", "hf-to-mcore", hf_chat, mcore, "--overwrite", "--no-progress",
                     "--verify"), os.path.join(out, "logs", "convert_chat.log"))
    print(f"  -> {mcore}: vocabulary {before} -> {len(tok)} (chat tokens "
          f"appended)\n     verify: {_verify_line(text)}")
    return mcore


def sft_overrides(mcore: str, chat: str, chat_tok_dir: str, steps: int, save: str, seed: int = 1234) -> list[str]:
    """tools/train.py overrides for the toy SFT (shared with examples/miniature.py)."""
    return [
        f"model.megatron_checkpoint={mcore}", "data.kind=sft", f"data.paths=[{chat}]",
        f"data.tokenizer={chat_tok_dir}", "data.chat_format=llama3", f"data.seq_length={L}",
        "data.pad_token_id=1", "data.document_mask=true", "data.reset_position_ids=true",
        f"train.steps={steps}", f"train.global_batch_size={SFT_BATCH}", "train.micro_batch_size=1", f"train.seed={seed}",
        f"optim.lr={SFT_LR}", f"optim.min_lr={SFT_LR}", "optim.warmup_steps=0", "optim.decay_style=constant",
        "optim.weight_decay=0.0", "train.log_interval=5", "train.device=cpu", f"train.save={save}",
        f"train.log_file={os.path.join(save, 'metrics.jsonl')}",
    ]


def stage_sft(out: str, mcore_chat: str, chat: str, chat_tok_dir: str) -> str:
    checkpoint, history = train(out, "sft", lambda save: sft_overrides(mcore_chat, chat, chat_tok_dir, SFT_STEPS, save))
    print(f"  -> {checkpoint}: assistant-token loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} over "
          f"{history[-1]['step']} steps of {SFT_BATCH} rows x {L} tokens")
    return checkpoint


def chat_prompt_ids(tok, key: str, value: str, length: int, depth: float) -> list[int]:
    """A chat-format question with a `length`-token prompt: the NIAH filler holding the fact at
    `depth`, the question, then the assistant header (the generation prompt)."""
    from toydata import facts

    from megatron_ultralong.data.samples.chat import ChatFormat, END_HEADER, START_HEADER, render_chat

    # The prompt is `length` tokens: 10 of headers, the question's 4, the fact's, the rest filler.
    filler = facts.haystack_text().split()[: length - 14 - facts.FACT_TOKENS]
    at = int(round(depth * len(filler)))
    content = " ".join([*filler[:at], facts.fact_text(key, value), *filler[at:], facts.chat_question(key)])
    text = render_chat([{"role": "user", "content": content}], ChatFormat("llama3"))
    return tok.encode(text + f"{START_HEADER}assistant{END_HEADER}\n\n", add_special_tokens=False).ids


def stage_chat(hf_sft: str, chat_tok_dir: str, length: int) -> tuple[float, str]:
    """Ask the SFT'd model CHAT_PROMPTS questions in its chat format at `length` tokens, greedy until
    <|eot_id|>; returns (fraction answered with the right value, one prompt's tail and its answer)."""
    import random

    import torch
    import transformers
    from tokenizers import Tokenizer

    from megatron_ultralong.data.samples.chat import EOT

    transformers.logging.set_verbosity_error()  # the generation-length reminder: 4L is the trained context
    tok = Tokenizer.from_file(os.path.join(chat_tok_dir, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_sft, local_files_only=True).eval()
    rng, hits, shown = random.Random(7), 0, ""
    for i in range(CHAT_PROMPTS):
        value = str(rng.randrange(1000, 10000))
        ids = chat_prompt_ids(tok, "amber", value, length, i / max(1, CHAT_PROMPTS - 1))
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tok.token_to_id(EOT), pad_token_id=1)
        answer = tok.decode(gen[0, len(ids):].tolist(), skip_special_tokens=False)
        hits += answer.replace(" ", "").startswith(f"{value}.{EOT}")  # exactly the value, ".", end of turn
        if i == CHAT_PROMPTS // 2:
            tail = tok.decode(ids[-14:], skip_special_tokens=False)
            shown = f"{len(ids)}-token prompt ending {tail!r}, needle 'amber is {value} .' at depth 50%\n" \
                    f"     model: {answer!r}"
    return hits / CHAT_PROMPTS, shown


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
         lengths=LENGTHS, depths=DEPTHS, seed: int = 0, chat: bool = False):
    """run_niah on the toy task (facts haystack and needle); returns NiahResults. chat: in the SFT
    model's chat format (facts.chat_niah_config, the chat tokenizer in `tokenizer_dir`)."""
    from toydata import facts

    from megatron_ultralong.eval.backends import HFBackend
    from megatron_ultralong.eval.haystack import Haystack
    from megatron_ultralong.eval.niah import run_niah
    from megatron_ultralong.eval.tokenizer import EvalTokenizer

    tok = EvalTokenizer.from_path(tokenizer_dir)
    hay = Haystack(tok, "facts", text=facts.haystack_text())
    return run_niah(HFBackend(model, prefill_chunk=1024), tok, lengths, depths, out_dir,
                    (facts.chat_niah_config if chat else facts.niah_config)(samples, seed=seed), title=title,
                    log=False, haystack=hay)


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
    fig.suptitle(f"NIAH before and after: L={L} base, YaRN x4, + {CPT_STEPS} CPT steps at {TARGET}, "
                 f"+ {SFT_STEPS} SFT steps at {L}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_niah(out: str, hf_base: str, hf_cpt: str, hf_sft: str, tok_dir: str, chat_tok_dir: str) -> tuple[float, float]:
    """NIAH for the base, YaRN untrained, after CPT (plain prompts: "<s> haystack amber is") and
    after SFT in the SFT model's chat format (the same needles, filler and depths as a user turn with
    the question, then the assistant header). The SFT model's plain-prompt scores are printed too.
    Returns the accuracy at 4L after CPT and after SFT (chat)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    eval_dir = os.path.join(out, "eval")

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()

    sft = load(hf_sft)
    panels = [
        ("base model (RoPE, trained at L)", niah(load(hf_base), tok_dir, os.path.join(eval_dir, "1_base"), "Base (RoPE, L=64)")),
        ("YaRN x4, no training", niah(yarn_untrained(hf_base), tok_dir, os.path.join(eval_dir, "2_yarn"), "YaRN x4, untrained")),
        (f"YaRN x4 + CPT ({CPT_STEPS} steps)", niah(load(hf_cpt), tok_dir, os.path.join(eval_dir, "3_yarn_cpt"), "YaRN x4 + CPT")),
        (f"+ SFT ({SFT_STEPS} at L), chat", niah(sft, chat_tok_dir, os.path.join(eval_dir, "4_sft_chat"),
                                                 "YaRN x4 + CPT + SFT, chat format", chat=True)),
    ]
    plain_sft = niah(sft, tok_dir, os.path.join(eval_dir, "5_sft_plain"), "YaRN x4 + CPT + SFT, plain prompt")
    figure = side_by_side(os.path.join(eval_dir, "niah_before_after.png"), panels)
    n = SAMPLES_PER_CELL * len(DEPTHS)
    print(f"  NIAH accuracy by context length ({n} prompts per length, needle at 5 depths):")
    print("    " + f"{'model':<32}" + "".join(f"{f'{x} ({x // L}x)':>12}" for x in LENGTHS))
    rows = panels + [(f"+ SFT, plain prompt", plain_sft)]
    for title, res in rows:
        print("    " + f"{title:<32}" + "".join(f"{v:>12.2f}" for v in per_length(res)))
    summary = {title: {"per_length": dict(zip(LENGTHS, per_length(res))), "scores": res.scores} for title, res in rows}
    with open(os.path.join(eval_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"  -> {figure} (heatmaps per model under {eval_dir}/*/niah_heatmap.png)")
    at_target = LENGTHS.index(TARGET)
    return per_length(panels[2][1])[at_target], per_length(panels[3][1])[at_target]


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
        print(f"[demo] {i}/10 {name}: {what}", flush=True)
        return time.perf_counter()

    def took(t: float) -> None:
        print(f"     ({time.perf_counter() - t:.1f}s)")

    t = step(1, "corpus", "synthetic fact-and-recall documents (Markov filler, one fact, its recall at the end)")
    corpus, tok_dir = stage_corpus(out)
    took(t)
    t = step(2, "dataset", "mu-build-dataset: per-domain length upsampling, <s> separators")
    prefix = stage_dataset(out, corpus, tok_dir)
    took(t)
    t = step(3, "base", "the base model, trained at L" + (" (pretraining it now)" if args.pretrain_base else ""))
    hf_base = stage_base(out, args.pretrain_base)
    took(t)
    t = step(4, "convert", f"mu-convert hf-to-mcore, RoPE -> YaRN {L} -> {TARGET}")
    mcore = stage_convert(out, hf_base)
    took(t)
    t = step(5, "cpt", f"continued pretraining at {TARGET} tokens, CP=2 on 2 CPU processes (tools/train.py)")
    checkpoint = stage_cpt(out, mcore, prefix)
    took(t)
    t = step(6, "export", "mu-convert mcore-to-hf --verify")
    hf_cpt = stage_export(out, checkpoint, "hf_cpt", os.path.join(out, "tokenizer"))
    took(t)
    t = step(7, "sft data", f"short chat conversations (<= L={L} tokens) through mu-prepare-sft")
    chat, chat_tok_dir = stage_sft_data(out)
    mcore_chat = extend_vocabulary(hf_cpt, chat_tok_dir, out)
    took(t)
    t = step(8, "sft", f"SFT at L={L} on the chat data, assistant-only loss, DP=2 (tools/train.py data.kind=sft)")
    sft_checkpoint = stage_sft(out, mcore_chat, chat, chat_tok_dir)
    took(t)
    t = step(9, "export", "mu-convert mcore-to-hf --verify (the SFT model)")
    hf_sft = stage_export(out, sft_checkpoint, "hf_sft", chat_tok_dir)
    took(t)
    t = step(10, "niah", "needle in a haystack: base, YaRN untrained, YaRN + CPT, + SFT; then a chat question")
    accuracy, sft_accuracy = stage_niah(out, hf_base, hf_cpt, hf_sft, tok_dir, chat_tok_dir)
    chat_long, shown = stage_chat(hf_sft, chat_tok_dir, TARGET)
    print(f"  the SFT model answering in its chat format at 4L={TARGET}: {chat_long:.0%} of {CHAT_PROMPTS} replies are "
          f"exactly '<value> .<|eot_id|>'; e.g. {shown}")
    took(t)
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s. NIAH at 4L={TARGET}: YaRN + CPT {accuracy:.2f} (floor "
          f"{ACCURACY_FLOOR}), + SFT {sft_accuracy:.2f} (floor {SFT_ACCURACY_FLOOR}). Logs: {os.path.join(out, 'logs')}")
    if accuracy < ACCURACY_FLOOR:
        raise SystemExit(f"[demo] FAILED: NIAH accuracy at {TARGET} after CPT is {accuracy:.2f} < {ACCURACY_FLOOR}")
    if sft_accuracy < SFT_ACCURACY_FLOOR:
        raise SystemExit(f"[demo] FAILED: NIAH accuracy at {TARGET} after SFT is {sft_accuracy:.2f} < {SFT_ACCURACY_FLOOR}")


if __name__ == "__main__":
    main()
