"""InfiniteBench generation and scoring for any model behind a text `generate` function.

Per sample, as upstream's `eval_yarn_mistral.py` does it: the task's prompt (`create_prompt`),
middle truncation to `truncate_tokens` (upstream: 128K; None: off, for a model whose context holds
the whole input), greedy generation up to the task's budget, and the row upstream writes to
`preds_<task>.jsonl` (`id`, `prediction`, `ground_truth`). `run_task` writes and scores one task;
`run_infinitebench` does all of them and the paper's average.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional, Sequence

from megatron_ultralong.eval.infinitebench.loader import load_samples
from megatron_ultralong.eval.infinitebench.metrics import average, score_infinitebench
from megatron_ultralong.eval.infinitebench.prompts import (DEFAULT_TRUNCATE, MAX_NEW_TOKENS, TASKS, PromptSet,
                                                           create_prompt, get_answer, truncate)
from megatron_ultralong.eval.jsonl import write_jsonl
from megatron_ultralong.eval.report import write_json

Generate = Callable[[str, int], str]
"""generate(prompt, max_new_tokens) -> the generated text (greedy, without the prompt)."""


def predict(generate: Generate, tokenizer: Any, samples: Sequence[dict], task: str,
            truncate_tokens: Optional[int] = DEFAULT_TRUNCATE, prompt_set: PromptSet = "yarn-mistral",
            max_new_tokens: Optional[int] = None) -> Iterator[dict]:
    """One `preds_<task>.jsonl` row per sample, in order. max_new_tokens overrides the task's
    budget (math_calc's is 30000)."""
    budget = max_new_tokens or MAX_NEW_TOKENS[task]
    for i, eg in enumerate(samples):
        where = f"{task} sample {i}"
        prompt = truncate(tokenizer, create_prompt(eg, task, prompt_set, where), truncate_tokens)
        yield {"id": i, "prediction": generate(prompt, budget), "ground_truth": get_answer(eg, task, where)}


def run_task(generate: Generate, tokenizer: Any, data_root: str, task: str, out_dir: str,
             truncate_tokens: Optional[int] = DEFAULT_TRUNCATE, prompt_set: PromptSet = "yarn-mistral",
             model_name: str = "", limit: Optional[int] = None, max_new_tokens: Optional[int] = None) -> dict:
    """Generate and score one task; writes `<out_dir>/preds_<task>.jsonl` atomically. Returns
    {"task", "score" (percent), "n", "path"}. model_name feeds the model-dependent parser
    (math_calc drops the first number for "gpt4")."""
    samples = load_samples(data_root, task)[:limit]
    rows = list(predict(generate, tokenizer, samples, task, truncate_tokens, prompt_set, max_new_tokens))
    path = write_jsonl(os.path.join(out_dir, f"preds_{task}.jsonl"), rows)
    score = score_infinitebench(task, [r["prediction"] for r in rows], [r["ground_truth"] for r in rows], model_name)
    return {"task": task, "score": score, "n": len(rows), "path": path}


def run_infinitebench(generate: Generate, tokenizer: Any, data_root: str, out_dir: str,
                      tasks: Sequence[str] = TASKS, truncate_tokens: Optional[int] = DEFAULT_TRUNCATE,
                      prompt_set: PromptSet = "yarn-mistral", model_name: str = "",
                      limit: Optional[int] = None) -> dict:
    """Every task; writes the prediction files and `<out_dir>/infinitebench_results.json` with
    {"scores": {task: percent}, "average": mean over the 12 tasks (None if some are missing)}."""
    scores = {t: run_task(generate, tokenizer, data_root, t, out_dir, truncate_tokens, prompt_set, model_name,
                          limit)["score"] for t in tasks}
    result = {"scores": scores, "average": average(scores), "truncate_tokens": truncate_tokens,
              "prompt_set": prompt_set, "model_name": model_name}
    write_json(os.path.join(out_dir, "infinitebench_results.json"), result)
    return result
