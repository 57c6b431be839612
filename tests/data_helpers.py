"""Shared helpers for tests/test_data_*.py: tiny tokenizers trained once per process, corpora,
recipes. Nothing is downloaded."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from megatron_ultralong.data.preprocess.recipe import BuildRecipe, recipe_from_dict
from toydata.corpus import generate_records
from toydata.tokenizer import train_llama3_style_tokenizer

_TMP = tempfile.mkdtemp(prefix="mu_data_tests_")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def corpus_records(n_docs: int = 300, seed: int = 3) -> List[Dict[str, str]]:
    return list(generate_records(n_docs, seed=seed))


@functools.lru_cache(maxsize=None)
def tokenizer_path(llama3_style: bool = True, ignore_merges: Optional[bool] = None) -> str:
    """A 3000-token byte-level BPE with Llama-3's regex and specials (trained once per process).

    llama3_style=False is the plain HF-trainer file; ignore_merges defaults to Llama-3's true for
    the Llama-3-style file and to the HF trainer's false for the plain one."""
    if ignore_merges is None:
        ignore_merges = llama3_style
    texts = [r["text"] for r in corpus_records(200, seed=11)]
    name = f"tokenizer_{'llama3' if llama3_style else 'plain'}_im{int(ignore_merges)}.json"
    path = os.path.join(_TMP, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(train_llama3_style_tokenizer(texts, 3000, llama3_style=llama3_style,
                                             ignore_merges=ignore_merges))
    return path


@functools.lru_cache(maxsize=None)
def sentencepiece_path() -> str:
    import sentencepiece as spm

    prefix = os.path.join(_TMP, "sp")
    texts = [r["text"] for r in corpus_records(200, seed=11)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=600, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, max_sentence_length=1 << 20,
    )
    return prefix + ".model"


def write_jsonl(path: str, records: List[Dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def make_recipe(inputs: Any, prefix: str, **sections: Any) -> BuildRecipe:
    """Recipe with test defaults (HF tokenizer, in-process, no sampling) plus overrides.

    `sections` maps top-level keys to values; dict values are merged into the defaults.
    """
    raw: Dict[str, Any] = {
        "inputs": inputs,
        "tokenizer": {"path": tokenizer_path(), "verify_docs": 64,
                      "proof_cache_dir": os.path.join(_TMP, "proof_cache")},
        "output": {"prefix": prefix},
        "workers": 0,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return recipe_from_dict(raw)


def megatron_tokenizer_stub(vocab_size: int, eod: int) -> SimpleNamespace:
    """What GPTDatasetConfig reads from a tokenizer: vocab_size and eod (pad falls back to -1)."""
    return SimpleNamespace(vocab_size=vocab_size, eod=eod,
                           unique_identifiers={"class": "stub", "vocab_size": vocab_size})
