"""A text-in, text-out greedy `generate(prompt, max_new_tokens) -> str` over a token backend: what
the LV-Eval and InfiniteBench runners call, so the same runner drives the HF and Megatron backends."""
from __future__ import annotations

from typing import Callable

from megatron_ultralong.eval.backends import Backend
from megatron_ultralong.eval.tokenizer import EvalTokenizer

Generate = Callable[[str, int], str]


def text_generate(backend: Backend, tokenizer: EvalTokenizer) -> Generate:
    """generate(prompt, n): BOS (if the tokenizer has one) + the prompt's ids, greedy up to n new
    tokens or the first stop id, decoded without special tokens (the stop id is dropped)."""

    def generate(prompt: str, max_new_tokens: int) -> str:
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
        out = backend.generate(ids, max_new_tokens, tokenizer.stop_ids)
        if out and out[-1] in tokenizer.stop_ids:
            out = out[:-1]
        return tokenizer.decode(out)

    return generate
