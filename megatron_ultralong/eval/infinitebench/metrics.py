"""InfiniteBench's scoring, as its `src/compute_scores.py` computes it (github.com/OpenBMB/InfiniteBench).

Each task has its own parser of the free-form generation; a task's score is the mean of the
per-sample values (booleans count 0/1), which upstream prints unrounded; the percent here is that
mean x 100. Upstream quirks kept on purpose, because published numbers carry them:
* math_calc drops the first number of the prediction when `model_name == "gpt4"` (its GPT-4 prompt
  made the model echo the first operand) — the one parser that depends on the model name;
* passkey/number_string compare the label with the first run of digits only;
* kv_retrieval compares the label, unchanged, with the words of the prediction, so a label given
  as a list never matches (upstream does not unwrap it);
* longbook_choice_eng credits a prediction whose first character is in "ABCD" by that letter
  alone, so "An apple" answers "A";
* code_run takes the last word as the integer answer; code_debug looks only at the first two
  characters or the text after an answer prefix;
* longbook_qa_chn is F1 over characters (not jieba words); longbook_sum_eng is ROUGE-Lsum F
  (`rouge_score`, what the `evaluate` library's "rouge" metric runs, no stemmer).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

from megatron_ultralong.eval.infinitebench.prompts import TASKS
from megatron_ultralong.eval.qa_metrics import f1_score, normalize_answer, normalize_zh_answer


def first_int_match(prediction: str) -> str:
    """The first run of ASCII digits in the prediction ("" if none)."""
    return next((item for item in re.split("[^0-9]", prediction) if item != ""), "")


def _words(pred: str, separators: str) -> list[str]:
    for c in separators:
        pred = pred.replace(c, " ")
    return pred.split()


def _first(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def kv_retrieval(pred: str, label: Any, model_name: str) -> bool:
    return label in _words(pred, "\n:\"'.,?!{}")


def passkey(pred: str, label: Any, model_name: str) -> bool:
    return _first(label) == first_int_match(pred)


def code_run(pred: str, label: Any, model_name: str) -> bool:
    words = _words(pred.strip(), "\n.`'\":")
    if not words:
        return False
    try:
        return _first(label) == int(words[-1])
    except ValueError:
        return False


def code_debug(pred: str, label: Any, model_name: str) -> bool:
    pred = pred.strip()
    fn_name, letter = label[0], label[1]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:  # the prediction ends with the prefix
            return False
        rest = pred[idx + len(prefix) + 1:]
        return rest.startswith(letter) or rest.startswith(fn_name)
    return False


def math_find(pred: str, label: Any, model_name: str) -> bool:
    label = _first(label)
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        raise ValueError(f"math_find label {label!r}: expected an int or a float")
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return False
    if isinstance(label, int):
        # Upstream crashes on a float-looking first number for an int label (int("3.5")); so do we,
        # but with a message.
        if "." in found.group(0):
            raise ValueError(f"math_find: integer label {label} but the prediction's first number is "
                             f"{found.group(0)!r} (InfiniteBench's scorer fails on this too)")
        return int(found.group(0)) == label
    return float(found.group(0)) == label


def longdialogue_qa_eng(pred: str, label: Any, model_name: str) -> bool:
    return label[0] in [w.upper() for w in _words(pred.strip(), "\n:\"'.,?!{}")]


def longbook_choice_eng(pred: str, label: Any, model_name: str) -> bool:
    pred = pred.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in label
    if pred in label:
        return True
    pred = _squeeze(pred)
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        after = pred[idx + len(prefix) + 1:]
        return any(after.startswith(s) for s in label)
    for word in pred.split():
        if word in "ABCD":  # a substring test upstream: "AB" or "" would pass too
            return word in label
    return False


def _squeeze(pred: str) -> str:
    """longbook_choice_eng's cleaning: separators to spaces, then runs of spaces to one (outer
    spaces kept, as upstream's replace loop keeps them)."""
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    return pred


def qa_f1(pred: str, label: Any, model_name: str) -> float:
    """English F1, best over the references."""
    tokens = normalize_answer(pred).split()
    return max((f1_score(tokens, normalize_answer(g).split()) for g in label), default=0.0)


def qa_f1_zh(pred: str, label: Any, model_name: str) -> float:
    """Chinese F1 over characters, best over the references."""
    chars = list(normalize_zh_answer(pred))
    return max((f1_score(chars, list(normalize_zh_answer(g))) for g in label), default=0.0)


def rouge_lsum(pred: str, label: Any, model_name: str) -> float:
    """ROUGE-Lsum F as `evaluate.load("rouge").compute(predictions=[pred], references=[label],
    use_aggregator=False)["rougeLsum"][0]`: rouge_score without stemming; a list of references
    is scored with `score_multi` (the best one), as evaluate does."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    if isinstance(label, list):
        return scorer.score_multi(label, pred)["rougeLsum"].fmeasure
    return scorer.score(label, pred)["rougeLsum"].fmeasure


def math_calc(pred: str, label: Any, model_name: str) -> float:
    if not isinstance(label, list):
        raise ValueError(f"math_calc label {label!r}: expected a list")
    if label and isinstance(label[0], list):
        label = label[0]
    nums = [int(item) for item in re.split("[^0-9]", pred) if item != ""]
    if model_name == "gpt4":  # upstream: its GPT-4 prompt makes the model echo the first value
        nums = nums[1:]
    cnt = 0
    for want, got in zip(label, nums):
        if want != got:
            break
        cnt += 1
    return cnt / len(label)


SCORERS: dict[str, Callable[[str, Any, str], Any]] = {
    "passkey": passkey, "number_string": passkey, "kv_retrieval": kv_retrieval, "code_run": code_run,
    "code_debug": code_debug, "longdialogue_qa_eng": longdialogue_qa_eng, "longbook_qa_eng": qa_f1,
    "longbook_sum_eng": rouge_lsum, "longbook_choice_eng": longbook_choice_eng, "longbook_qa_chn": qa_f1_zh,
    "math_find": math_find, "math_calc": math_calc,
}
"""`compute_scores.get_score_one`'s table, for the 12 tasks."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown InfiniteBench task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def sample_score(task: str, pred: str, label: Any, model_name: str = "") -> float:
    """One sample's value in [0, 1]."""
    return float(SCORERS[check_task(task)](pred, label, model_name))


def sample_scores(task: str, preds: Sequence[str], labels: Sequence[Any], model_name: str = "") -> list[float]:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    return [sample_score(task, p, lab, model_name) for p, lab in zip(preds, labels)]


def score_infinitebench(task: str, preds: Sequence[str], labels: Sequence[Any], model_name: str = "") -> float:
    """The task's score in percent: 100 x `compute_scores.get_score` (unrounded, as upstream prints it)."""
    if not preds:
        raise ValueError(f"InfiniteBench {task}: no predictions to score")
    values = sample_scores(task, preds, labels, model_name)
    return 100 * (sum(values) / len(values))


def average(scores: dict[str, float], tasks: Sequence[str] = TASKS) -> Optional[float]:
    """The single InfiniteBench number of the paper's tables: the unweighted mean of the task
    scores, None unless every task in `tasks` has one."""
    if not all(t in scores for t in tasks):
        return None
    return sum(scores[t] for t in tasks) / len(tasks)
