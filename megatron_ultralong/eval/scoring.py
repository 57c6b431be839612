"""Deterministic answer scoring: exact match and substring match (RULER's string_match_all/part).

No LLM judge: the NIAH judge penalises correct answers with extra words (needle-in-a-haystack #39),
and RULER (github.com/NVIDIA/RULER scripts/eval/synthetic/constants.py) and Fu et al.
(arXiv:2402.10171) score by string matching.

One deliberate difference from RULER: a reference only matches as a whole token, i.e. not inside
a longer run of letters/digits. RULER's plain `ref in pred` credits "12345678" for the answer
"1234567"; for numeric needles that is a wrong answer, so we do not count it.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Sequence

SCORERS = ("all", "part", "exact")


def normalize_prediction(text: str) -> str:
    """RULER's post-processing: control characters become spaces, outer whitespace is stripped."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text).strip()


def _check_refs(refs: Sequence[str]) -> None:
    if isinstance(refs, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if not refs:
        raise ValueError("no reference answers to score against")
    for r in refs:
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"reference answer {r!r}: expected a non-empty string")


def contains_answer(prediction: str, reference: str) -> bool:
    """Case-insensitive: `reference` occurs in `prediction`, not inside a longer alphanumeric run."""
    ref = re.escape(reference.strip())
    # Guard only the ends that are alphanumeric: "sky-blue" must still match inside "(sky-blue)".
    left = r"(?<![0-9a-z])" if reference.strip()[0].isalnum() else ""
    right = r"(?![0-9a-z])" if reference.strip()[-1].isalnum() else ""
    return re.search(left + ref + right, normalize_prediction(prediction).lower(), flags=re.IGNORECASE) is not None


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of `references` found in `prediction`, in [0, 1] (RULER's niah/vt metric)."""
    _check_refs(references)
    return sum(contains_answer(prediction, r) for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in `prediction`, else 0.0 (RULER's QA metric)."""
    _check_refs(references)
    return float(any(contains_answer(prediction, r) for r in references))


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the prediction's first line, stripped of whitespace and closing punctuation, equals a
    reference (case-insensitive). Strict: extra words fail, which base models often produce."""
    _check_refs(references)
    first_line = prediction.strip().split("\n", 1)[0]  # before normalizing, which eats "\n"
    pred = normalize_prediction(first_line).rstrip(".,;:!? ").lower()
    return float(any(pred == r.strip().rstrip(".,;:!? ").lower() for r in references))


def score(prediction: str, references: Sequence[str], scorer: str = "all") -> float:
    """Dispatch by name: "all" (string_match_all), "part" (string_match_part) or "exact"."""
    if scorer == "all":
        return string_match_all(prediction, references)
    if scorer == "part":
        return string_match_part(prediction, references)
    if scorer == "exact":
        return exact_match(prediction, references)
    raise ValueError(f"scorer={scorer!r}: expected one of {SCORERS}")
