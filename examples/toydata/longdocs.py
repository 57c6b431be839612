"""A synthetic long-context corpus: most bytes in very long documents of five kinds.

What a long-context continued-pretraining mix looks like to a tokenizer (UltraLong upsamples
documents of 8K+ tokens; books, arXiv and code repositories supply them): 80% of the bytes are in
documents of 20K-300K words, the rest in short web pages. The kinds differ in what the split regex
and BPE see: web (URLs, numbers, punctuation), wiki (headings, lists, dates, infobox lines), code
(indentation, operators, identifiers), arxiv (LaTeX commands and math) and books (paragraphs,
dialogue in curly quotes). Words come from `SyntheticText`'s lexicon; nothing is downloaded.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, Iterator, List

from toydata.corpus import _EXTRA, SyntheticText

KINDS = ("web", "wiki", "code", "arxiv", "books")
LONG_WORDS = (20_000, 300_000)
LONG_BYTE_SHARE = 0.8
BYTES_PER_WORD = 7.2  # measured on this generator's output (JSON escapes aside)


def _sentence(text: SyntheticText, rng: random.Random, n: int) -> str:
    words = rng.choices(text.words, cum_weights=text.cum_weights, k=n)
    words[0] = words[0].capitalize()
    if rng.random() < 0.05:  # accented Latin, CJK, emoji, curly apostrophes now and then
        words[rng.randrange(n)] = rng.choice(_EXTRA)
    return " ".join(words) + rng.choice((".", ".", ".", "?", "!", ";"))


def _web(text, rng, n_words) -> List[str]:
    out, n = [], 0
    while n < n_words:
        k = rng.randrange(6, 30)
        s = _sentence(text, rng, k)
        r = rng.random()
        if r < 0.1:
            s += f" https://www.{rng.choice(text.words)}.com/{rng.choice(text.words)}?id={rng.randrange(10**6)}"
        elif r < 0.2:
            s += f" ({rng.randrange(1, 100)}% off, ${rng.randrange(1, 999)}.{rng.randrange(100):02d})"
        out.append(s + ("\n" if rng.random() < 0.2 else " "))
        n += k
    return out


def _wiki(text, rng, n_words) -> List[str]:
    out, n = [], 0
    while n < n_words:
        out.append(f"\n== {_sentence(text, rng, rng.randrange(1, 4))[:-1].title()} ==\n")
        for _ in range(rng.randrange(2, 8)):
            k = rng.randrange(10, 40)
            year = rng.randrange(1200, 2025)
            out.append(f"{_sentence(text, rng, k)[:-1]} in {year} ({year - rng.randrange(1, 80)}–{year}). ")
            n += k
        if rng.random() < 0.4:
            out.append("\n" + "".join(f"* {_sentence(text, rng, rng.randrange(2, 8))}\n" for _ in range(rng.randrange(2, 6))))
        if rng.random() < 0.2:
            out.append(f"| population = {rng.randrange(10**7):,} | area_km2 = {rng.random() * 1000:.2f}\n")
    return out


def _code(text, rng, n_words) -> List[str]:
    out, n = [], 0
    while n < n_words:
        name = "_".join(rng.choices(text.words[:2000], k=2))
        args = ", ".join(rng.choices(text.words[:500], k=rng.randrange(1, 4)))
        lines = [f"def {name}({args}):\n", f'    """{_sentence(text, rng, rng.randrange(4, 12))}"""\n']
        for _ in range(rng.randrange(3, 15)):
            a, b = rng.choices(text.words[:800], k=2)
            indent = "    " * rng.randrange(1, 4)
            lines.append(rng.choice((
                f"{indent}{a} = {b}[{rng.randrange(64)}] + {rng.random():.4f}\n",
                f"{indent}if {a} >= {b} and not {a}.{b}():\n",
                f"{indent}for i in range(len({a})):  # {_sentence(text, rng, 4)}\n",
                f"{indent}return {{'{a}': {b}, \"n\": 0x{rng.randrange(1 << 16):04X}}}\n",
                f"{indent}{a}.append({b} ** 2 - {rng.randrange(1000)})\n",
            )))
        out.append("".join(lines) + "\n")
        n += 4 * len(lines)
    return out


def _arxiv(text, rng, n_words) -> List[str]:
    out, n = [], 0
    greek = ("alpha", "beta", "gamma", "theta", "lambda", "sigma", "omega", "mu")
    while n < n_words:
        k = rng.randrange(15, 60)
        s = _sentence(text, rng, k)
        r = rng.random()
        if r < 0.3:
            g = rng.choice(greek)
            s += f" Let $\\{g}_{{{rng.randrange(1, 9)}}} = \\sum_{{i=1}}^{{N}} x_i^{{2}} / \\sqrt{{d}}$."
        elif r < 0.4:
            s += (f"\n\\begin{{equation}}\n  \\mathcal{{L}}(\\theta) = -\\frac{{1}}{{T}}\\sum_{{t}} "
                  f"\\log p_\\theta(x_t \\mid x_{{<t}}) + {rng.random():.3f}\n\\end{{equation}}\n")
        elif r < 0.5:
            s += f" \\cite{{{rng.choice(text.words)}{rng.randrange(1990, 2025)}}}."
        out.append(s + ("\n\n" if rng.random() < 0.1 else " "))
        n += k
    return out


def _books(text, rng, n_words) -> List[str]:
    out, n = [], 0
    names = [w.capitalize() for w in text.words[100:140]]
    while n < n_words:
        para = []
        for _ in range(rng.randrange(2, 8)):
            k = rng.randrange(5, 25)
            s = _sentence(text, rng, k)
            if rng.random() < 0.3:
                s = f"“{s}” said {rng.choice(names)}, {rng.choice(('quietly', 'at last', 'again'))}."
            para.append(s)
            n += k
        out.append(" ".join(para) + "\n\n")
    return out


STYLES: Dict[str, Callable] = {"web": _web, "wiki": _wiki, "code": _code, "arxiv": _arxiv,
                               "books": _books}


def long_context_records(total_bytes: int, seed: int = 1, lexicon_size: int = 200_000) -> Iterator[Dict[str, str]]:
    """Records {"text", "domain"} adding up to about `total_bytes` of UTF-8 text, ~80% of it in
    documents of 20K-300K words (log-uniform), in a seeded shuffled order."""
    text = SyntheticText(seed, lexicon_size)
    rng = random.Random(seed + 7)
    plan = []  # (kind, words)
    long_bytes, short_bytes = 0.0, 0.0
    while long_bytes + short_bytes < total_bytes:
        if long_bytes < LONG_BYTE_SHARE * (long_bytes + short_bytes + 1):
            words = int(math.exp(rng.uniform(*map(math.log, LONG_WORDS))))
            words = min(words, int((total_bytes - long_bytes - short_bytes) / BYTES_PER_WORD) + 1)
            plan.append((rng.choice(("books", "arxiv", "code", "wiki")), words))
            long_bytes += BYTES_PER_WORD * words
        else:
            words = int(rng.lognormvariate(math.log(800), 1.0)) + 20
            plan.append((rng.choice(KINDS), words))
            short_bytes += BYTES_PER_WORD * words
    rng.shuffle(plan)
    for kind, words in plan:
        yield {"text": "".join(STYLES[kind](text, rng, words)).strip(), "domain": kind}
