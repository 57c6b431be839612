"""RULER's scoring, as its own evaluator computes it (github.com/NVIDIA/RULER,
`scripts/eval/evaluate.py` and `scripts/eval/synthetic/constants.py`).

RULER post-processes each prediction (`postprocess_pred`: strip; every character in \\x00-\\x1f
becomes a newline; strip again) and scores a task with one of two metrics over all its samples:

* `string_match_all` (niah_*, vt, cwe, fwe): per sample, the fraction of references that occur in
  the prediction (case-insensitive substring), averaged over samples;
* `string_match_part` (qa_1, qa_2): per sample, 1 if any reference occurs, averaged.

Both return percent rounded with Python's `round(score, 2)`. The arithmetic below is RULER's, in
RULER's order (sum of per-sample values, / n, * 100), so a file scores to the same float. Quirks
kept on purpose, because published numbers carry them: a reference is matched anywhere, so
"1234567" is credited inside "12345678"; an empty reference string matches every prediction. The
project's stricter whole-token match is `megatron_ultralong.eval.scoring` (scorer "strict").
"""
from __future__ import annotations

import re
from typing import Callable, Literal, Sequence

RulerMetric = Literal["string_match_all", "string_match_part"]

_CONTROL = re.compile(r"[\x00-\x1f]")

TASK_METRIC: dict[str, RulerMetric] = {
    "niah_single_1": "string_match_all",
    "niah_single_2": "string_match_all",
    "niah_single_3": "string_match_all",
    "niah_multikey_1": "string_match_all",
    "niah_multikey_2": "string_match_all",
    "niah_multikey_3": "string_match_all",
    "niah_multivalue": "string_match_all",
    "niah_multiquery": "string_match_all",
    "vt": "string_match_all",
    "cwe": "string_match_all",
    "fwe": "string_match_all",
    "qa_1": "string_match_part",
    "qa_2": "string_match_part",
}
"""RULER's 13 tasks (`scripts/synthetic.yaml`) and the metric of each one's base task."""

RULER_TASK_NAMES: tuple[str, ...] = tuple(TASK_METRIC)


def postprocess_pred(prediction: str) -> str:
    """RULER's `postprocess_pred`: strip, control characters (\\x00-\\x1f) to newlines, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _check(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference lists")
    if not preds:
        raise ValueError("no predictions to score")
    for i, (p, ref) in enumerate(zip(preds, refs)):
        if not isinstance(p, str):
            raise ValueError(f"prediction {i}: expected a string, got {type(p).__name__}")
        if isinstance(ref, str) or not ref or not all(isinstance(r, str) for r in ref):
            raise ValueError(f"references {i}: expected a non-empty list of strings, got {ref!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found in the prediction, percent, 2 decimals."""
    _check(preds, refs)
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found in the prediction, percent, 2 decimals."""
    _check(preds, refs)
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


METRICS: dict[RulerMetric, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def sample_score(task: str, prediction: str, refs: Sequence[str]) -> float:
    """One sample's value in [0, 1] under the task's metric (after postprocess_pred), unrounded."""
    metric = metric_of(task)
    pred = postprocess_pred(prediction).lower()
    _check([pred], [refs])
    hits = [1.0 if r.lower() in pred else 0.0 for r in refs]
    return sum(hits) / len(hits) if metric == "string_match_all" else max(hits)


def metric_of(task: str) -> RulerMetric:
    """The metric RULER scores `task` with; ValueError naming an unknown task."""
    try:
        return TASK_METRIC[task]
    except KeyError:
        raise ValueError(f"unknown RULER task {task!r}; expected one of {', '.join(RULER_TASK_NAMES)}") from None


def score_ruler(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's score for `task` (percent, rounded to 2 decimals as RULER rounds) of raw predictions
    `preds` against reference lists `refs` (RULER's `outputs` field), post-processed as RULER does."""
    metric = METRICS[metric_of(task)]
    return metric([postprocess_pred(p) if isinstance(p, str) else p for p in preds], refs)
