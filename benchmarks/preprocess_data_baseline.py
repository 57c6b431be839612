"""Runs the REAL Megatron-LM `tools/preprocess_data.py` (tag core_v0.16.1) as the dataset-builder
benchmark baseline. Nothing of it is re-implemented here: this file only prepares what it needs
and starts it as its own process.

- A Megatron-LM source checkout at the pinned tag (`--megatron-lm DIR`):
      git clone --depth 1 --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM DIR
  preprocess_data.py imports `megatron.training` (absent from the megatron-core wheel), so it runs
  with DIR first on PYTHONPATH: the checkout's own `megatron` package, not the installed one.
- A Python with `megatron.training`'s import-time dependencies (`--python`, default
  `bench_out/preprocess_venv/bin/python`). `setup_venv` makes one *beside* the project venv: a new
  venv that sees the project venv's packages through a .pth file (torch, transformers, numpy are
  not installed twice) and gets the missing ones installed into itself: six, triton and pydantic
  (what the imports of `megatron/training/__init__.py` at core_v0.16.1 fail on, found by running
  it). The project venv is never modified.
- A tokenizer *directory*, as `--tokenizer-type HuggingFaceTokenizer --tokenizer-model` takes:
  the tokenizer.json plus a tokenizer_config.json naming the eos token (`--append-eod` appends
  `tokenizer.eod`, i.e. the eos id). No BOS: the tokenizer.json has no post-processor.

    python benchmarks/preprocess_data_baseline.py CORPUS.jsonl tokenizer.json OUT_PREFIX \
        --workers 2 --megatron-lm ~/src/Megatron-LM-core_v0.16.1
Output: OUT_PREFIX_text_document.bin/.idx (preprocess_data.py's naming) and a JSON line with the
wall time measured around the process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PINNED_TAG = "core_v0.16.1"
IMPORT_TIME_DEPS = ("six", "triton", "pydantic")
DEFAULT_VENV = os.path.join(ROOT, "bench_out", "preprocess_venv")


def setup_venv(venv: str = DEFAULT_VENV, base_python: str = sys.executable) -> str:
    """A venv beside the project's one, seeing its packages, with megatron.training's extra
    import-time deps installed into itself; returns its python."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([base_python, "-m", "venv", venv], check=True)
        base_site = subprocess.run(
            [base_python, "-c", "import site; print(site.getsitepackages()[0])"],
            check=True, capture_output=True, text=True).stdout.strip()
        site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "zz_project_venv.pth"), "w") as f:
            f.write(base_site + "\n")
    missing = [d for d in IMPORT_TIME_DEPS if subprocess.run(
        [python, "-c", f"import {d}"], capture_output=True).returncode != 0]
    if missing:
        subprocess.run([python, "-m", "pip", "install", "-q", *missing], check=True)
    return python


def check_checkout(megatron_lm: str) -> str:
    script = os.path.join(megatron_lm, "tools", "preprocess_data.py")
    if not os.path.isfile(script):
        raise SystemExit(f"--megatron-lm {megatron_lm}: no tools/preprocess_data.py (check out "
                         f"Megatron-LM at tag {PINNED_TAG} there)")
    return script


def tokenizer_dir(tokenizer_json: str, eos_token: str, out_dir: str) -> str:
    """The directory AutoTokenizer.from_pretrained (HuggingFaceTokenizer) loads."""
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token}, f)
    return out_dir


def command(python: str, script: str, corpus: str, tok_dir: str, prefix: str,
            workers: int) -> list:
    return [python, script, "--input", corpus, "--output-prefix", prefix,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
            "--workers", str(workers), "--append-eod", "--json-keys", "text",
            "--log-interval", "100000"]


def environment(megatron_lm: str) -> dict:
    env = dict(os.environ)
    # The checkout's `megatron` (with megatron.training) must shadow the installed megatron-core.
    env["PYTHONPATH"] = os.path.abspath(megatron_lm)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("tokenizer_json")
    parser.add_argument("prefix")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eos-token", default="<|end_of_text|>")
    parser.add_argument("--megatron-lm", required=True, help=f"Megatron-LM checkout at {PINNED_TAG}")
    parser.add_argument("--python", help="python with megatron.training's deps (default: make "
                        f"{os.path.relpath(DEFAULT_VENV, ROOT)})")
    args = parser.parse_args()
    script = check_checkout(args.megatron_lm)
    python = args.python or setup_venv()
    tok = tokenizer_dir(args.tokenizer_json, args.eos_token, args.prefix + ".tokenizer")
    start = time.time()
    subprocess.run(command(python, script, args.corpus, tok, args.prefix, args.workers),
                   check=True, env=environment(args.megatron_lm), stdout=subprocess.DEVNULL)
    print(json.dumps({"seconds": time.time() - start, "prefix": args.prefix + "_text_document"}))


if __name__ == "__main__":
    main()
