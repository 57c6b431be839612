"""The paper's standard benchmarks through lm-evaluation-harness (the `lm-eval` package), on an
exported HF model: MMLU 5-shot, MMLU-Pro 5-shot, MATH 0-shot, GSM8K 8-shot, HumanEval 0-shot
pass@1 (arXiv 2504.06214, Table 2), and their average.

lm-eval owns the prompts, few-shot examples, answer extraction and metrics; this module only
fixes which lm-eval task, shot count and metric stand for each column, runs them one task at a
time (so each has its own shot count) and writes the paper's row. Which lm-eval task stands for
a column is a choice the paper does not spell out; the defaults are lm-eval's tasks that match the
stated protocol, and each is overridable (`--task NAME=LM_EVAL_TASK:SHOTS:METRIC`):
* MMLU: `mmlu`, 5-shot, `acc` (sample-weighted over the 57 subjects, lm-eval's group score);
* MMLU-Pro: `mmlu_pro`, 5-shot chain of thought, `exact_match` after its answer extraction;
* MATH: `minerva_math` (the 5000 MATH test problems), 0-shot, `exact_match`;
* GSM8K: `gsm8k_cot`, 8-shot chain of thought (Wei et al.'s exemplars), `exact_match` strict match;
* HumanEval: `humaneval`, 0-shot, `pass@1` of greedy completions. It executes model-written code
  (lm-eval's `confirm_run_unsafe_code`, and the `code_eval` metric wants HF_ALLOW_CODE_EVAL=1):
  run it in a sandbox.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional, Sequence

from megatron_ultralong.eval.report import _atomic_write, write_json


@dataclasses.dataclass(frozen=True)
class StandardTask:
    """One column of the paper's standard-benchmark table."""

    column: str
    """The paper's column name ("MMLU", ...)."""

    lm_eval_task: str
    """The lm-eval task or group name run for it."""

    num_fewshot: int
    """Few-shot examples per prompt (the paper's protocol)."""

    metric: str
    """The lm-eval results key, "<metric>,<filter>" (e.g. "acc,none", "pass@1,create_test")."""


PAPER_TASKS: tuple[StandardTask, ...] = (
    StandardTask("MMLU", "mmlu", 5, "acc,none"),
    StandardTask("MMLU-Pro", "mmlu_pro", 5, "exact_match,custom-extract"),
    StandardTask("MATH", "minerva_math", 0, "exact_match,none"),
    StandardTask("GSM8K", "gsm8k_cot", 8, "exact_match,strict-match"),
    StandardTask("HumanEval", "humaneval", 0, "pass@1,create_test"),
)


@dataclasses.dataclass(frozen=True)
class StandardConfig:
    """What to run and how."""

    tasks: tuple[StandardTask, ...] = PAPER_TASKS
    """The columns to run, in table order."""

    batch_size: int = 1
    """lm-eval's batch size."""

    limit: Optional[int] = None
    """At most this many documents per task (a smoke test; the scores are then not the paper's)."""

    apply_chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template (instruction-tuned models)."""

    allow_code_eval: bool = False
    """Run code-executing tasks (HumanEval). Off by default: they execute model-written code."""

    include_path: Optional[str] = None
    """A folder of extra lm-eval task YAMLs (custom or local-data tasks)."""

    include_defaults: bool = True
    """Index lm-eval's own tasks too (False: only `include_path`'s, which skips indexing its
    thousands of YAMLs)."""


def _needs_code(task: StandardTask) -> bool:
    return "pass@" in task.metric


def run_standard(lm: Any, config: StandardConfig = StandardConfig()) -> dict:
    """Run every task of `config` on `lm` (an `lm_eval` LM, e.g. `HFLM(pretrained=path)`).
    Returns {"scores": {column: percent}, "average": mean of the columns (None if any is missing),
    "n_shot": {column: the shot count lm-eval reports having used}, "tasks": [task settings],
    "lm_eval_version": str}. ValueError naming a task whose metric is not in lm-eval's results."""
    for task in config.tasks:  # before lm-eval's slow import and task indexing
        if _needs_code(task) and not config.allow_code_eval:
            raise ValueError(f"{task.column} ({task.lm_eval_task}) executes model-written code: pass "
                             "allow_code_eval / --allow-code-eval (and set HF_ALLOW_CODE_EVAL=1) to run it")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=config.include_path, include_defaults=config.include_defaults)
    scores: dict[str, float] = {}
    n_shot: dict[str, int] = {}
    for task in config.tasks:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[task.lm_eval_task], num_fewshot=task.num_fewshot, batch_size=config.batch_size,
            limit=config.limit, apply_chat_template=config.apply_chat_template, task_manager=manager,
            confirm_run_unsafe_code=_needs_code(task), log_samples=False, bootstrap_iters=0)
        if out is None:  # non-zero ranks of a distributed lm-eval run
            continue
        results = out["results"].get(task.lm_eval_task, {})
        if task.metric not in results:
            raise ValueError(f"{task.column}: lm-eval task {task.lm_eval_task!r} reported no {task.metric!r} "
                             f"(it has {sorted(k for k in results if ',' in k)})")
        scores[task.column] = 100.0 * float(results[task.metric])
        n_shot[task.column] = int(out.get("n-shot", {}).get(task.lm_eval_task, task.num_fewshot))
    columns = [t.column for t in config.tasks]
    average = sum(scores[c] for c in columns) / len(columns) if all(c in scores for c in columns) else None
    return {"scores": scores, "average": average, "n_shot": n_shot,
            "tasks": [dataclasses.asdict(t) for t in config.tasks], "limit": config.limit,
            "lm_eval_version": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def markdown_table(result: dict, model: str) -> str:
    """The paper's Table 2 layout: one row, the columns then their average, in percent."""
    cols = [t["column"] for t in result["tasks"]]
    cells = [f"{result['scores'][c]:.2f}" if c in result["scores"] else "-" for c in cols]
    avg = "-" if result["average"] is None else f"{result['average']:.2f}"
    return (f"| model | {' | '.join(cols)} | Avg. |\n|---|{'---|' * (len(cols) + 1)}\n"
            f"| {model} | {' | '.join(cells)} | {avg} |\n")


def parse_task(spec: str) -> StandardTask:
    """"COLUMN=LM_EVAL_TASK:SHOTS:METRIC" -> StandardTask; ValueError naming the flag otherwise."""
    try:
        column, rest = spec.split("=", 1)
        name, shots, metric = rest.split(":", 2)
        return StandardTask(column, name, int(shots), metric)
    except ValueError:
        raise ValueError(f"--task {spec!r}: expected COLUMN=LM_EVAL_TASK:SHOTS:METRIC, "
                         "e.g. GSM8K=gsm8k:8:exact_match,strict-match") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mu-eval-standard", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported HF model directory (mu-convert's output)")
    p.add_argument("--out", required=True, help="folder for standard_results.json and standard_table.md")
    p.add_argument("--task", action="append", default=None,
                   help="replace the paper's columns with COLUMN=LM_EVAL_TASK:SHOTS:METRIC (repeatable)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="documents per task (smoke test)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--allow-code-eval", action="store_true", help="run HumanEval (executes model-written code)")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tasks = tuple(parse_task(s) for s in args.task) if args.task else PAPER_TASKS
    except ValueError as e:
        parser.error(str(e))
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r}: not a directory")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=args.model, dtype=args.dtype, device=args.device, batch_size=args.batch_size)
    config = StandardConfig(tasks=tasks, batch_size=args.batch_size, limit=args.limit,
                            apply_chat_template=args.chat_template, allow_code_eval=args.allow_code_eval,
                            include_path=args.include_path)
    result = run_standard(lm, config)
    result["model"] = args.model
    write_json(os.path.join(args.out, "standard_results.json"), result)
    table = markdown_table(result, os.path.basename(os.path.normpath(args.model)))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(table)

    _atomic_write(os.path.join(args.out, "standard_table.md"), write)
    print(table, end="")


if __name__ == "__main__":
    main()
