"""`mu-eval-score BENCHMARK PRED_FILE --task TASK [--model-name NAME] [--json]`: score a predictions
file written in a benchmark's own layout, as that benchmark's evaluator scores it.

Layouts (one JSON object per line):
* ruler: `pred` (str) and `outputs` (list of str), as RULER's `scripts/pred/call_api.py` writes
  them; scored as RULER's `scripts/eval/evaluate.py` (percent, rounded to 2 decimals);
* lveval: `pred`, `answers` (list) and optional `gold_ans`, as LV-Eval's `prediction.py` writes
  them; scored as its `evaluation.py` (percent, rounded to 2 decimals);
* infinitebench: `prediction` (or `pred`) and `ground_truth` (or `label`), as InfiniteBench's
  `eval_*.py` write `preds_<task>.jsonl`; scored as its `compute_scores.py` (x 100, unrounded).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from megatron_ultralong.eval.infinitebench.metrics import score_infinitebench
from megatron_ultralong.eval.infinitebench.prompts import TASKS as INFINITEBENCH_TASKS
from megatron_ultralong.eval.jsonl import read_jsonl_file
from megatron_ultralong.eval.lveval.metrics import score_lveval
from megatron_ultralong.eval.lveval.prompts import DATASETS as LVEVAL_DATASETS
from megatron_ultralong.eval.lveval.prompts import LENGTHS as LVEVAL_LENGTHS
from megatron_ultralong.eval.lveval.prompts import split_name

BENCHMARKS = ("ruler", "lveval", "infinitebench")
RULER_METRICS_MODULE = "megatron_ultralong.eval.ruler.metrics"


def _ruler():
    """RULER's scorer module (score_ruler, RULER_TASK_NAMES)."""
    import importlib

    return importlib.import_module(RULER_METRICS_MODULE)


def _ruler_tasks() -> Sequence[str]:
    try:
        return _ruler().RULER_TASK_NAMES
    except ImportError:  # pragma: no cover - only before the RULER scorer is installed
        return ()


def _field(obj: dict, keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in obj:
            return obj[key]
    raise ValueError(f"{where}: no field {' or '.join(repr(k) for k in keys)}")


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _str_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of strings")
    return value


def score_file(benchmark: str, path: str, task: str, model_name: str = "") -> dict:
    """{"benchmark", "task", "score" (percent, the evaluator's rounding), "n"} of a predictions file.
    ValueError naming the file and line for a malformed row, or the task if unknown."""
    rows = read_jsonl_file(path)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    if benchmark == "ruler":
        metrics = _ruler()
        metrics.metric_of(task)  # unknown task: ValueError naming it
        preds = [_string(_field(o, ("pred",), w), "pred", w) for w, o in rows]
        refs = [_str_list(_field(o, ("outputs",), w), "outputs", w) for w, o in rows]
        score = metrics.score_ruler(task, preds, refs)
    elif benchmark == "lveval":
        split_name(task)
        preds = [_string(_field(o, ("pred",), w), "pred", w) for w, o in rows]
        answers = [_str_list(_field(o, ("answers",), w), "answers", w) for w, o in rows]
        gold = [o.get("gold_ans") for _, o in rows]
        for (w, _), g in zip(rows, gold):
            if g is not None and not isinstance(g, str):
                raise ValueError(f"{w}: field 'gold_ans' must be a string or null")
        score = score_lveval(task, preds, answers, gold)
    elif benchmark == "infinitebench":
        if task not in INFINITEBENCH_TASKS:
            raise ValueError(f"unknown InfiniteBench task {task!r}; expected one of {', '.join(INFINITEBENCH_TASKS)}")
        # As compute_scores.get_labels: the label key is the first of ground_truth/label that the
        # first row has; predictions take prediction, else pred, per row.
        label_key = next((k for k in ("ground_truth", "label") if k in rows[0][1]), None)
        if label_key is None:
            raise ValueError(f"{rows[0][0]}: no field 'ground_truth' or 'label'")
        preds = [_string(_field(o, ("prediction", "pred"), w), "prediction", w) for w, o in rows]
        labels = [_field(o, (label_key,), w) for w, o in rows]
        score = score_infinitebench(task, preds, labels, model_name)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    return {"benchmark": benchmark, "task": task, "score": score, "n": len(rows)}


def build_parser() -> argparse.ArgumentParser:
    lv = ", ".join(LVEVAL_DATASETS)
    ruler = ", ".join(_ruler_tasks()) or f"(the RULER scorer, {RULER_METRICS_MODULE}, is not installed)"
    epilog = (f"tasks:\n  ruler:         {ruler}\n"
              f"  lveval:        {lv}\n                 (each optionally with a length suffix: "
              f"{', '.join('_' + x for x in LVEVAL_LENGTHS)})\n"
              f"  infinitebench: {', '.join(INFINITEBENCH_TASKS)}")
    p = argparse.ArgumentParser(
        prog="mu-eval-score", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Score a predictions file in a benchmark's own layout, as that benchmark's evaluator does "
                    "(RULER scripts/eval/evaluate.py, LV-Eval evaluation.py, InfiniteBench compute_scores.py x 100).")
    p.add_argument("benchmark", choices=BENCHMARKS, metavar="BENCHMARK", help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("pred_file", metavar="PRED_FILE", help="JSONL predictions in the benchmark's layout")
    p.add_argument("--task", required=True, help="the benchmark's task name (listed below)")
    p.add_argument("--model-name", default="",
                   help="InfiniteBench: the model name compute_scores.py takes (math_calc drops the first number "
                        "for 'gpt4')")
    p.add_argument("--json", action="store_true", help="print one JSON object: benchmark, task, score (percent), n")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = score_file(args.benchmark, args.pred_file, args.task, args.model_name)
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.exit(2, f"mu-eval-score: error: {e}\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['benchmark']} {result['task']}: {result['score']} (n={result['n']})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
