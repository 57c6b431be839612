"""LV-Eval generation and scoring for any model behind a text `generate` function.

`predict` does what LV-Eval's `prediction.get_pred` does per sample: fill the dataset's prompt,
middle-truncate it to `max_length` tokens (None: no truncation), wrap it by model name
(`build_chat`), generate greedily up to the dataset's budget, post-process, and emit the row
`prediction.py` writes (`pred`, `answers`, `gold_ans` = the sample's `answer_keywords`, `input`,
`all_classes`, `length`). `run_file` writes those rows to `<out>/<name>_<level>.jsonl` (the file
name LV-Eval's `evaluation.py` parses) and scores them; `run_lveval` does every dataset and level
and adds the paper's aggregates.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional, Sequence

from megatron_ultralong.eval.jsonl import write_jsonl
from megatron_ultralong.eval.lveval.loader import load_samples
from megatron_ultralong.eval.lveval.metrics import aggregate, score_lveval
from megatron_ultralong.eval.lveval.prompts import (DATASETS, LENGTHS, MAX_NEW_TOKENS, build_chat, build_prompt,
                                                    post_process, truncate_prompt)
from megatron_ultralong.eval.report import write_json

Generate = Callable[[str, int], str]
"""generate(prompt, max_new_tokens) -> the generated text (greedy, without the prompt)."""


def predict(generate: Generate, tokenizer: Any, samples: Sequence[dict], name: str,
            max_length: Optional[int] = None, model_name: str = "") -> Iterator[dict]:
    """One `prediction.py` row per sample of dataset `name`, in order."""
    for sample in samples:
        prompt = truncate_prompt(tokenizer, build_prompt(name, sample), max_length)
        pred = post_process(generate(build_chat(prompt, model_name), MAX_NEW_TOKENS[name]), model_name)
        yield {
            "pred": pred,
            "answers": sample["answers"],
            "gold_ans": sample.get("answer_keywords"),
            "input": sample["input"],
            "all_classes": sample.get("all_classes"),
            "length": sample.get("length"),
        }


def run_file(generate: Generate, tokenizer: Any, data_root: str, name: str, level: str, out_dir: str,
             max_length: Optional[int] = None, model_name: str = "", limit: Optional[int] = None) -> dict:
    """Generate and score `<name>_<level>`; writes `<out_dir>/<name>_<level>.jsonl` atomically.
    Returns {"task", "score" (percent, LV-Eval's rounding), "n", "path"}. `limit`: first n samples."""
    samples = load_samples(data_root, name, level)[:limit]
    rows = list(predict(generate, tokenizer, samples, name, max_length, model_name))
    path = write_jsonl(os.path.join(out_dir, f"{name}_{level}.jsonl"), rows)
    score = score_lveval(name, [r["pred"] for r in rows], [r["answers"] for r in rows],
                         [r["gold_ans"] for r in rows])
    return {"task": f"{name}_{level}", "score": score, "n": len(rows), "path": path}


def run_lveval(generate: Generate, tokenizer: Any, data_root: str, out_dir: str,
               datasets: Sequence[str] = DATASETS, lengths: Sequence[str] = LENGTHS,
               max_length: Optional[int] = None, model_name: str = "", limit: Optional[int] = None) -> dict:
    """Every dataset at every level; writes the prediction files and `<out_dir>/lveval_results.json`
    with {"scores": {dataset: {level: score}}, "aggregate": {level | "<128K" | "<256K": mean}}."""
    scores: dict[str, dict[str, float]] = {}
    for name in datasets:
        for level in lengths:
            scores.setdefault(name, {})[level] = run_file(generate, tokenizer, data_root, name, level, out_dir,
                                                          max_length, model_name, limit)["score"]
    result = {"scores": scores, "aggregate": aggregate(scores), "max_length": max_length, "model_name": model_name}
    write_json(os.path.join(out_dir, "lveval_results.json"), result)
    return result
