"""Deterministic synthetic documents for tests, benchmarks and the demo corpus (no downloads).

The text is generated, not copied: words are random syllable strings drawn with a Zipf-like law,
so BPE learns realistic merges, plus the things tokenizers disagree on in practice (digit runs,
whitespace runs, punctuation, CJK, emoji, accented Latin, code-like lines). Document lengths follow
a log-normal law with a long tail, which is what per-domain length upsampling acts on.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

_SYLLABLES = (
    "ka ri to na mo se lu pa ve di ro sa ne ta mi ko ba le go hu ur an en in on th er st qu".split()
)
_EXTRA = ("café", "naïve", "Zürich", "東京", "数据", "模型", "😀", "🚀", "Ωmega", "—", "’s", "'re")
_CODE = ("def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\ty += i;\n}\n")


@dataclass(frozen=True)
class DomainShape:
    """How documents of one synthetic domain look."""

    name: str
    """Domain label written into each record's `domain` field."""

    median_words: int
    """Median document length in words (log-normal median)."""

    sigma: float
    """Log-normal spread; 1.0+ gives a long tail of documents far above the median."""

    weight: float
    """Relative number of documents drawn from this domain."""


DEFAULT_DOMAINS = (
    DomainShape("web", median_words=250, sigma=1.0, weight=6.0),
    DomainShape("code", median_words=500, sigma=1.2, weight=2.0),
    DomainShape("books", median_words=3000, sigma=1.0, weight=1.0),
)


class SyntheticText:
    """A fixed random lexicon; `document(rng, n_words)` returns text of about n_words words."""

    def __init__(self, seed: int = 0, lexicon_size: int = 5000):
        rng = random.Random(seed)
        self.words: List[str] = []
        for _ in range(lexicon_size):
            n = rng.choice((1, 2, 2, 3, 3, 4))
            self.words.append("".join(rng.choice(_SYLLABLES) for _ in range(n)))
        # Zipf weights: word k is drawn with probability proportional to 1 / (k + 2).
        self.cum_weights: List[float] = []
        total = 0.0
        for k in range(lexicon_size):
            total += 1.0 / (k + 2)
            self.cum_weights.append(total)

    def document(self, rng: random.Random, n_words: int) -> str:
        words = rng.choices(self.words, cum_weights=self.cum_weights, k=max(1, n_words))
        parts: List[str] = []
        for i, w in enumerate(words):
            r = rng.random()
            if r < 0.01:
                w = rng.choice(_EXTRA)
            elif r < 0.02:
                w = str(rng.randrange(0, 10 ** rng.randrange(1, 9)))
            elif r < 0.025:
                w = w.capitalize() + "."
            parts.append(w)
            if i % 97 == 96:
                parts.append("\n\n" if rng.random() < 0.5 else "\n")
            elif i % 211 == 210:
                parts.append(rng.choice(_CODE))
            elif r > 0.995:
                parts.append("   ")
        return " ".join(parts).replace("\n ", "\n")


def generate_records(
    n_docs: int, seed: int = 0, domains: Sequence[DomainShape] = DEFAULT_DOMAINS,
    lexicon_size: int = 5000,
) -> Iterator[Dict[str, str]]:
    """Yield `n_docs` records {"text", "domain"}; the same seed gives the same records.

    A 500K-word lexicon gives enough distinct pairs to train a ~100K-token BPE."""
    text = SyntheticText(seed, lexicon_size)
    rng = random.Random(seed + 1)
    cum = []
    total = 0.0
    for d in domains:
        total += d.weight
        cum.append(total)
    for _ in range(n_docs):
        shape = rng.choices(domains, cum_weights=cum, k=1)[0]
        n_words = int(rng.lognormvariate(0.0, shape.sigma) * shape.median_words)
        yield {"text": text.document(rng, n_words), "domain": shape.name}


def write_jsonl(path: str, records: Iterator[Dict[str, str]]) -> int:
    """Write records as JSON lines; returns the number of bytes written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            n += len(line.encode("utf-8"))
    return n
