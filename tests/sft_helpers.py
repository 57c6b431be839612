"""Shared fixtures of the SFT tests: a tiny Llama-3-style tokenizer and chat JSONL writers."""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sft")
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# Llama-3's pre-tokenizer split (tokenizer.json pre_tokenizer.pretokenizers[0]).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Answer: 42!\n\nsystem user assistant",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are a helpful assistant.",
    "def add(a, b):\n    return a + b\n# code, math: 3 + 4 = 7; naïve café 東京",
] * 20


@functools.lru_cache(maxsize=None)
def tokenizer_json() -> str:
    """A byte-level BPE with Llama-3's split regex and chat special tokens (trained in ~0.1 s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(LLAMA3_SPECIALS),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def write_tokenizer(directory: str) -> str:
    path = os.path.join(directory, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(tokenizer_json())
    return path


def hf_tokenizer(template_file: str):
    """transformers' fast tokenizer over the same tokenizer, with one of Meta's chat templates."""
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(FIXTURES, template_file), encoding="utf-8") as f:
        template = f.read()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=template,
    )


def write_jsonl(path: str, conversations: Sequence[Sequence[dict]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")
    return path


def conversation(k: int, turns: int = 1, system: bool = False) -> list[dict]:
    """A deterministic conversation whose length grows with k."""
    out = [{"role": "system", "content": f"You are assistant number {k}."}] if system else []
    for t in range(turns):
        out.append({"role": "user", "content": f"Question {k}.{t}: what is {k} + {t}?" + " more" * (k % 5)})
        out.append({"role": "assistant", "content": f"The answer is {k + t}." + " fox" * (k % 7)})
    return out
