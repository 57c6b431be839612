"""Small tokenizers of Llama-3's kind, trained on the fly, for tests, benchmarks and the demo.

Nothing here downloads anything. `train_llama3_style_tokenizer` trains a byte-level BPE with the
Llama-3 pre-tokenizer split regex and then rewrites it the way Llama-3's own `tokenizer.json` was
made: Meta's tokenizer is a tiktoken BPE (ranks), and transformers' `TikTokenConverter` turned the
ranks into a `tokenizer.json` whose merges are *every* split of a token into two vocab tokens,
ordered by the merged token's rank, with `ignore_merges: true`. `ignore_merges=False` gives the
same file with the flag off (as many published tokenizers ship), and `llama3_style=False` the plain
HF-trainer BPE (merges in creation order, not closed under splitting; the trainer's default
`ignore_merges: false` unless asked otherwise). The tiktoken fast path (`tiktoken_path.py`) proves
all of these equivalent to HF.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Sequence, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_ultralong.data.preprocess.byte_level import bytes_to_unicode

# Llama-3 / 3.1 pre-tokenizer split regex (tokenizer.json `pre_tokenizer.pretokenizers[0]`), the
# same pattern as Meta's tiktoken `pat_str` (https://github.com/meta-llama/llama3/blob/main/llama/tokenizer.py).
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Llama-3.1 special tokens that matter to data preparation, in Llama-3's order after the BPE
# ranks (base + i). The 256 reserved tokens of the real tokenizer are left out to keep files small.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)


def _train_plain(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                pattern=_regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def _ranked_tokens(tok: Tokenizer) -> List[bytes]:
    """Token byte strings in rank order: the 256 bytes first, then merged tokens by creation."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab = tok.get_vocab(with_added_tokens=False)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    ranked = [bytes([b]) for b in range(256)]
    seen = set(ranked)
    for token, _ in by_id:
        raw = bytes(byte_of[c] for c in token)
        if raw not in seen:
            seen.add(raw)
            ranked.append(raw)
    return ranked


def _tiktoken_style_json(ranked: Sequence[bytes], special_tokens: Sequence[str]) -> str:
    """tokenizer.json as transformers' TikTokenConverter writes it from tiktoken ranks."""
    enc = bytes_to_unicode()

    def to_str(raw: bytes) -> str:
        return "".join(enc[b] for b in raw)

    rank = {tok: i for i, tok in enumerate(ranked)}
    merges: List[Tuple[int, int, int]] = []
    for tok, r in rank.items():
        local = [
            (rank[tok[:i]], rank[tok[i:]], r)
            for i in range(1, len(tok))
            if tok[:i] in rank and tok[i:] in rank
        ]
        merges.extend(sorted(local))
    merges.sort(key=lambda m: m[2])
    base = len(ranked)
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": base + i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, s in enumerate(special_tokens)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {to_str(t): i for i, t in enumerate(ranked)},
            "merges": [[to_str(ranked[a]), to_str(ranked[b])] for a, b, _ in merges],
        },
    }
    return json.dumps(data, ensure_ascii=False)


def train_llama3_style_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
    llama3_style: bool = True,
    ignore_merges: bool = True,
) -> str:
    """Train a byte-level BPE on `texts`; returns the tokenizer.json text.

    llama3_style=True rewrites it as Llama-3's file is laid out (ranks == ids, merges closed under
    splitting, specials after the ranks); False returns the plain HF-trained file, with the same
    regex and special tokens appended. `ignore_merges` sets the model's flag in either file.
    """
    plain = _train_plain(texts, vocab_size)
    if llama3_style:
        data = json.loads(_tiktoken_style_json(_ranked_tokens(plain), special_tokens))
    else:
        plain.add_special_tokens(list(special_tokens))
        data = json.loads(plain.to_str())
    data["model"]["ignore_merges"] = ignore_merges
    return json.dumps(data, ensure_ascii=False)


def tiktoken_ranks_to_tokenizer_json(ranks: Dict[bytes, int], ignore_merges: bool = False,
                                     special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS) -> str:
    """tokenizer.json text for tiktoken `ranks`, written by transformers' own `TikTokenConverter`
    (as Llama-3's file was: merges = every split of a token into two lower-ranked tokens, by
    rank), with Llama-3's split regex and specials, no post-processor, and `ignore_merges` set."""
    import base64
    import os
    import tempfile

    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.NamedTemporaryFile("w", suffix=".tiktoken", delete=False) as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    try:
        converted = TikTokenConverter(vocab_file=f.name, pattern=LLAMA3_SPLIT_REGEX,
                                      extra_special_tokens=list(special_tokens)).converted()
    finally:
        os.remove(f.name)
    data = json.loads(converted.to_str())
    data["model"]["ignore_merges"] = ignore_merges
    data["post_processor"] = None  # no BOS added by encode
    return json.dumps(data, ensure_ascii=False)


def llama3_with_appended_tokens(base_texts: Iterable[str], extra_texts: Iterable[str],
                                base_vocab: int, extra_vocab: int,
                                ignore_merges: bool = False) -> Tuple[str, int]:
    """A tokenizer with merge exceptions made the way Llama-3's was: a BPE's ranks (Meta: OpenAI's
    cl100k_base) with the new tokens of a second BPE trained on other text appended after them
    (Meta: 28K tokens), converted by `TikTokenConverter`. Returns (tokenizer.json text, number of
    appended tokens)."""
    ranks = {tok: i for i, tok in enumerate(_ranked_tokens(_train_plain(base_texts, base_vocab)))}
    base = len(ranks)
    for tok in _ranked_tokens(_train_plain(extra_texts, extra_vocab)):
        ranks.setdefault(tok, len(ranks))
    return tiktoken_ranks_to_tokenizer_json(ranks, ignore_merges), len(ranks) - base
