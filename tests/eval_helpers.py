"""Tiny tokenizer and tiny Llama for the evaluation tests (nothing downloads).

The tokenizer is a byte-level BPE trained in well under a second on the shipped haystack text and
the task templates, with digits split one per token (so passkeys are several tokens, as with real
tokenizers) and <s> / </s> as BOS / EOS.
"""
from __future__ import annotations

import os
from typing import Optional

from llama_helpers import tiny_llama

from megatron_ultralong.eval.haystack import NOISE_SENTENCE, haystack_text
from megatron_ultralong.eval.tasks import NIAH_NEEDLE, NIAH_PREFIX, NIAH_SUFFIX, VT_PREFIX, VT_SUFFIX

VOCAB_SIZE = 400


def train_tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A `PreTrainedTokenizerFast` (byte-level BPE, individual digits, <s>/</s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = [haystack_text("essay"), NOISE_SENTENCE, NIAH_PREFIX, NIAH_NEEDLE, NIAH_SUFFIX, VT_PREFIX, VT_SUFFIX,
             "What is the pass key? The pass key is 0123456789. Remember it."]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_eval_llama(vocab_size: int, seed: int = 0, rope_scaling: Optional[dict] = None,
                    max_position_embeddings: int = 4096):
    """The tests' tiny Llama (llama_helpers) narrowed for evaluation: H=32, d=8, F=64, bos 0 / eos 1,
    weights x10 so greedy argmax is far from ties."""
    return tiny_llama(vocab_size, kv_heads=2, rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings,
                      seed=seed, weight_scale=10.0, hidden_size=32, head_dim=8, intermediate_size=64,
                      rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, attn_implementation="sdpa")


def save_tiny_hf(directory: str, vocab_size: int = VOCAB_SIZE) -> tuple[str, str]:
    """Write the tiny tokenizer and model to directory/{tokenizer,model}; returns both paths."""
    tok = train_tiny_tokenizer(vocab_size)
    tok_dir, model_dir = os.path.join(directory, "tokenizer"), os.path.join(directory, "model")
    tok.save_pretrained(tok_dir)
    tiny_eval_llama(len(tok)).save_pretrained(model_dir)
    return tok_dir, model_dir


def train_ruler_tokenizer(vocab_size: int = 1200):
    """A byte-level BPE like `train_tiny_tokenizer`, also trained on RULER's templates and the RULER
    fixtures, so that RULER's minimum haystacks (e.g. vt's 500-token one-shot example) fit."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_ultralong.eval.ruler.constants import BASE_TASKS, NEEDLE, NOISE

    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "ruler")
    with open(os.path.join(fixtures, "PaulGrahamEssays.json"), encoding="utf-8") as f:
        essay = json.load(f)["text"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [essay, NOISE * 4, NEEDLE, "VAR ABCDE = VAR FGHIJ \n" * 4]
    texts += [s.template + s.answer_prefix for s in BASE_TASKS.values()] * 4
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
