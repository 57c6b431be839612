"""The toy inputs of tests/slurm/slurm_chain.py, written into a fresh $WORK at the README's paths.

- models/Llama-3.1-8B-Instruct: a random 2-layer Llama (hidden 64) with the toy Llama-3 tokenizer of
  examples/data/toy_tokenizer.json (Llama-3's split regex and chat special tokens), in the files an
  HF download has (config.json, model.safetensors, tokenizer.json, tokenizer_config.json);
- corpus/: examples/data/tiny_corpus.jsonl (three domains, as examples/data/tiny_recipe.yaml uses it);
- downloads/AceMath-Instruct-Training-Data/data/general_sft_stage2.parquet: chat rows in that
  dataset's layout (features `messages` [{role, content}] and `answer`, per its card at
  https://huggingface.co/datasets/nvidia/AceMath-Instruct-Training-Data);
- recipes/: the shipped data and training recipes with the toy sizes put in and every path kept,
  so the chain connects exactly where the real one does.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
MODEL_DIR = "models/Llama-3.1-8B-Instruct"
ACEMATH_FILE = "downloads/AceMath-Instruct-Training-Data/data/general_sft_stage2.parquet"
CPT_STEPS = 1600
"""Enough steps (0.02-0.1 s each on 2 cores, slower beside the chain's other jobs) that the time-limit
signal, which Slurm sends at its next periodic time-limit check (every 30 s) after the limit is
lowered, arrives before the requeue test's first run could finish even on an idle machine
(30 s / 0.02 s = 1,500 steps)."""
SFT_STEPS = 4
REFERENCE_LOG = "logs/cpt_1m.jsonl"
REQUEUE_SAVE = "checkpoints/requeue_1m"
REQUEUE_LOG = "logs/requeue_1m.jsonl"
TRAINED = ("llama31_8b_1m", "llama31_8b_1m_sft", "llama31_8b_4m", "llama31_8b_4m_sft")


def real_recipes() -> dict:
    """The shipped recipes as written (YAML dicts)."""
    out = {n: yaml.safe_load((REPO / "examples" / "recipes" / f"{n}.yaml").read_text()) for n in TRAINED}
    out["data"] = yaml.safe_load((REPO / "examples" / "data" / "ultralong_1b.yaml").read_text())
    return out


def write_model(work: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = work / MODEL_DIR
    target.mkdir(parents=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(REPO / "examples" / "data" / "toy_tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.save_pretrained(str(target))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(target))


def write_acemath(work: Path, n: int = 64) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("answer", pa.string())])
    rows = []
    for k in range(n):
        a, b = k % 9 + 1, (3 * k) % 7 + 2
        messages = [{"role": "user", "content": f"What is {a} plus {b}? Answer with the number."}]
        if k % 3 == 0:
            messages = [{"role": "system", "content": "You are a helpful assistant."}] + messages
        rows.append({"messages": messages, "answer": f"{a} plus {b} is {a + b}."})
    path = work / ACEMATH_FILE
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))


def tiny_data_recipe(real: dict) -> dict:
    r = copy.deepcopy(real)
    r.update(inputs=["corpus/tiny_corpus.jsonl"], domain_field="domain", workers=0)
    r["tokenizer"]["fast_path"] = "off"  # proving tiktoken equal to HF takes ~30 s on this tokenizer
    r["upsampling"].update(total_tokens=60000, short_threshold=512, long_threshold=2048)
    return r  # tokenizer (models/.../tokenizer.json), separator and output.prefix as shipped


def tiny_train_recipe(real: dict, name: str) -> dict:
    """A shipped training recipe at toy size: model, layout, lengths and steps change; paths do not."""
    r = copy.deepcopy(real)
    sft = name.endswith("_sft")
    r["model"].update(config=None, params_dtype="float32", recompute="none")
    r["model"].pop("recompute_modules", None)
    r["parallel"] = {"tensor_parallel": 1, "pipeline_parallel": 1, "context_parallel": 1 if sft else 2,
                     "sequence_parallel": False}
    r["data"]["seq_length"] = 128 if sft else 512
    if sft:
        r["data"].update(pad_token_id=1004, eod_token_id=1009)  # <|finetune_right_pad_id|>, <|eot_id|>
    r["optim"].update(lr=1e-3, min_lr=1e-3 if not sft else 0.0, warmup_steps=0 if not sft else 1)
    steps = SFT_STEPS if sft else CPT_STEPS if name == "llama31_8b_1m" else 2
    r["train"].update(steps=steps, global_batch_size=2 if sft else 1, save_interval=1000, device="cpu",
                      loss_chunk_tokens=64)
    r["train"].pop("peak_tflops", None)
    if name == "llama31_8b_1m":
        r["train"]["log_file"] = REFERENCE_LOG
    return r


def write_all(work: Path, real: dict) -> dict:
    """Write the inputs; return {"data": data recipe path, <recipe name>: tiny recipe path}."""
    write_model(work)
    (work / "corpus").mkdir()
    shutil.copy(REPO / "examples" / "data" / "tiny_corpus.jsonl", work / "corpus" / "tiny_corpus.jsonl")
    write_acemath(work)
    (work / "recipes").mkdir()
    paths = {"data": work / "recipes" / "ultralong_1b.yaml"}
    paths["data"].write_text(yaml.safe_dump(tiny_data_recipe(real["data"]), sort_keys=False))
    for name in TRAINED:
        paths[name] = work / "recipes" / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(tiny_train_recipe(real[name], name), sort_keys=False))
    return paths
