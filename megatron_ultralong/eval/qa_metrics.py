"""Answer normalisation, token F1 and middle truncation shared by LV-Eval and InfiniteBench.

Both benchmarks copy these from LongBench (github.com/THUDM/LongBench `metrics.py`): LV-Eval's
`metrics.py` and InfiniteBench's `src/compute_scores.py` carry the same `normalize_answer`,
`normalize_zh_answer` and Counter-based `f1_score`. One home for them here; each benchmark's
`metrics.py` adds what is its own (LV-Eval's keyword-recall gate and blacklists, InfiniteBench's
task parsers). Written from the upstream definitions, not copied.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Sequence

_EN_PUNCT = frozenset(string.punctuation)
# LongBench's Chinese punctuation list, plus ASCII punctuation (`normalize_zh_answer`).
_CN_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ZH_PUNCT = frozenset(string.punctuation + _CN_PUNCT)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """LongBench/SQuAD normalisation: lower case, drop ASCII punctuation, drop the articles
    a/an/the (as whole words), collapse whitespace to single spaces. The order matters and is
    upstream's: punctuation goes before articles, so "the." loses its article too."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def normalize_zh_answer(s: str) -> str:
    """LongBench's Chinese normalisation: lower case, drop ASCII and Chinese punctuation, drop all
    whitespace (Chinese text is compared without spaces)."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ZH_PUNCT).split())


def f1_counts(prediction: Sequence[str], ground_truth: Sequence[str]) -> tuple[float, float, float]:
    """(F1, precision, recall) of two token lists by multiset overlap; (0, 0, 0) when nothing is
    shared (so an empty prediction scores 0, never divides by zero)."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0, 0.0, 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall), precision, recall


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-multiset F1 of two token lists (0 when nothing is shared)."""
    return f1_counts(prediction, ground_truth)[0]


def hf_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer behind `tokenizer` (an `EvalTokenizer` or a transformers one)."""
    return getattr(tokenizer, "hf_tokenizer", tokenizer)


def middle_ids(ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """The head and tail that middle truncation keeps: `max_length // 2` ids from each end (both
    LV-Eval's `truncate_prompt` and InfiniteBench's `truncate_input` keep `max_length // 2` from
    each end, so an odd limit keeps one id fewer). Returns (ids, []) when nothing is cut."""
    if max_length < 2:
        raise ValueError(f"truncation length {max_length}: expected >= 2")
    ids = list(ids)
    if len(ids) <= max_length:
        return ids, []
    half = max_length // 2
    return ids[:half], ids[-half:]
