"""RULER-style synthetic tasks at several lengths: per-task, per-length scores (RULER,
arXiv:2404.06654, github.com/NVIDIA/RULER).

Scores are RULER's: string_match_all per sample (fraction of expected strings present), averaged
and reported in percent, per task and length, plus the mean over tasks per length. RULER's
"effective length" rule (largest length whose mean beats Llama-2-7B's 85.6 at 4K) is reported too,
with the threshold as an argument since it only means something for real models.

Each (length, task) cell is one `grid.GridRunner` cell: appended to `<out>/ruler_cells.jsonl` when
done, skipped by a re-run with the same --out, with progress and ETA lines.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from megatron_ultralong.eval.backends import Backend
from megatron_ultralong.eval.identity import run_identity
from megatron_ultralong.eval.grid import Cell, GridRunner, OverLength, check_length
from megatron_ultralong.eval.haystack import Haystack
from megatron_ultralong.eval.niah import check_grid, run_sample
from megatron_ultralong.eval.report import save_line_plot, write_json
from megatron_ultralong.eval.tasks import RULER_TASKS, make_sample
from megatron_ultralong.eval.tokenizer import EvalTokenizer

RULER_THRESHOLD = 85.6  # Llama-2-7B's 4K average, RULER's bar for "effective length"


def effective_length(lengths: Sequence[int], means: Sequence[float], threshold: float) -> Optional[int]:
    """Largest length L such that every length up to L scores above `threshold` (None if the first
    length already fails)."""
    best = None
    for length, mean in sorted(zip(lengths, means)):
        if mean <= threshold:
            break
        best = length
    return best


def run_ruler(
    backend: Backend,
    tokenizer: EvalTokenizer,
    lengths: Sequence[int],
    out_dir: Optional[str],
    tasks: Sequence[str] = RULER_TASKS,
    samples_per_length: int = 4,
    seed: int = 0,
    max_new_tokens: Optional[int] = None,
    threshold: float = RULER_THRESHOLD,
    log: bool = True,
    split_queries: bool = False,
    over_length: OverLength = "warn",
) -> dict:
    """Score every task at every length; writes ruler_results.json and ruler_scores.png to out_dir
    (writer rank only). Returns {"scores": {task: {length: percent}}, "mean": {length: percent},
    "effective_length": int | None, "samples": [...]}. max_new_tokens overrides each task's budget
    (default: the answers' tokens + a margin). split_queries: niah_multiquery's keys asked as
    separate questions of one prefilled context (tasks.py). over_length: see grid.check_length."""
    check_grid(lengths, [0.0])
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks {list(tasks)}: expected a non-empty subset of {RULER_TASKS}")
    if samples_per_length < 1:
        raise ValueError(f"--samples {samples_per_length}: expected >= 1")
    haystacks: dict[str, Haystack] = {}
    header = {"task": "ruler", "tasks": list(tasks), "samples_per_length": samples_per_length, "seed": seed,
              "max_new_tokens": max_new_tokens, "split_queries": split_queries,
              "identity": run_identity(backend, tokenizer)}
    runner = GridRunner(None if out_dir is None else os.path.join(out_dir, "ruler_cells.jsonl"), header, backend,
                        "ruler", log=log)
    grid = {f"length={int(n)}/task={t}": (int(n), t) for n in lengths for t in tasks}
    cells = [Cell(key, float(n) * samples_per_length, f"length {n} {t}") for key, (n, t) in grid.items()]
    checked: set[int] = set()

    def compute(cell: Cell) -> dict:
        length, task = grid[cell.key]
        recs = []
        for k in range(samples_per_length):
            sample = make_sample(task, tokenizer, length, seed * 1_000_003 + k, haystacks,
                                 split_queries=split_queries)
            if max_new_tokens is not None:
                sample = dataclasses.replace(sample, max_new_tokens=max_new_tokens)
            if length not in checked:
                checked.add(length)
                check_length(length, sample.max_new_tokens, getattr(backend, "max_position_embeddings", None),
                             over_length)
            recs.append(run_sample(backend, tokenizer, sample))
        return {"score": 100.0 * sum(r["score"] for r in recs) / len(recs), "samples": recs}

    scores: dict[str, dict[int, float]] = {t: {} for t in tasks}
    records = []
    for key, res in zip(grid, runner.run(cells, compute, lambda r: f"{r['score']:6.1f}")):
        length, task = grid[key]
        scores[task][length] = res["score"]
        records.extend(res["samples"])
    means = {int(n): sum(scores[t][int(n)] for t in tasks) / len(tasks) for n in lengths}
    result = {
        "tasks": list(tasks),
        "lengths": [int(n) for n in lengths],
        "samples_per_length": samples_per_length,
        "scores": scores,
        "mean": means,
        "threshold": threshold,
        "effective_length": effective_length(list(means), list(means.values()), threshold),
        "samples": records,
    }
    if out_dir is not None and backend.is_writer:
        result["json_path"] = write_json(os.path.join(out_dir, "ruler_results.json"), result)
        series = {t: (list(scores[t]), list(scores[t].values())) for t in tasks}
        series["mean"] = (list(means), list(means.values()))
        result["plot_path"] = save_line_plot(os.path.join(out_dir, "ruler_scores.png"), series,
                                             "Context length (tokens)", "Score (%)", "RULER-style tasks",
                                             ylim=(0.0, 100.0))
    return result
