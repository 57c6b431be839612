"""One command for the paper's long-context table: every configured benchmark on one model, each
cell routed to a backend by its prompt size, resumable, with progress and ETA, ending in
`suite_results.json` and `suite_table.md` (the model's row beside the paper's published rows).

Routing: a cell whose prompt (+ generation) is at most `hf_max_tokens` runs on the HF backend
(one device holds its KV cache); longer ones on the Megatron backend, whose prefill and KV cache
are split over the context-parallel ranks. Each (benchmark, backend) pair has its own grid file
`<out>/suite/<benchmark>_<backend>_cells.jsonl` whose header holds the benchmark's configuration
and the weights / tokenizer / backend identity (identity.py), so a re-run with the same --out
computes only the cells that are missing and never reuses another model's.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol

from megatron_ultralong.config_io import load_yaml
from megatron_ultralong.eval.grid import Cell, GridRunner, _format_seconds
from megatron_ultralong.eval.identity import run_identity
from megatron_ultralong.eval.report import write_json
from megatron_ultralong.eval.suite.paper import COLUMN_ORDER, PAPER, PUBLISHED
from megatron_ultralong.eval.suite.registry import BenchCell, Benchmark, make

logger = logging.getLogger(__name__)

BackendKind = Literal["hf", "megatron"]


@dataclass(frozen=True)
class SuiteConfig:
    """A suite run (the --suite-config YAML)."""

    benchmarks: dict = field(default_factory=dict)
    """benchmark name -> its options (e.g. ruler: {lengths: [...], samples: 500, inputs: {...}});
    run in this order."""

    hf_max_tokens: int = 131072
    """Cells whose prompt + generation fit this many tokens run on the HF backend, longer ones on
    the Megatron CP backend."""

    model_name: str = "evaluated model"
    """The table row's name."""


def load_suite_config(path: str) -> SuiteConfig:
    """Read and check a suite YAML; ValueError naming the file and key."""
    data = load_yaml(path)
    known = {"benchmarks", "hf_max_tokens", "model_name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    benches = data.get("benchmarks")
    if not isinstance(benches, dict) or not benches:
        raise ValueError(f"{path}: 'benchmarks' must map benchmark names to their options")
    hf_max = data.get("hf_max_tokens", SuiteConfig.hf_max_tokens)
    if not isinstance(hf_max, int) or isinstance(hf_max, bool) or hf_max < 0:
        raise ValueError(f"{path}: hf_max_tokens={hf_max!r}: expected an integer >= 0")
    return SuiteConfig(dict(benches), hf_max, str(data.get("model_name", SuiteConfig.model_name)))


class BackendPool(Protocol):
    """Loads a backend of a kind on first use (the CLI's; tests pass their own)."""

    is_writer: bool

    def available(self, kind: BackendKind) -> bool:
        """Whether this process runs cells of `kind` (e.g. HF cells on the writer rank only)."""
        ...

    def get(self, kind: BackendKind) -> tuple[Any, Any]:
        """(backend, EvalTokenizer) of `kind`, loaded once."""
        ...


def route(cell: BenchCell, hf_max_tokens: int) -> BackendKind:
    return "hf" if cell.prompt_tokens <= hf_max_tokens else "megatron"


class _Progress:
    """Suite-wide progress: cells done of all, elapsed and ETA by prompt tokens x prompts."""

    def __init__(self, todo_cost: float, total: int, done: int):
        self.todo, self.total, self.done, self.spent, self.t0 = todo_cost, total, done, 0.0, time.perf_counter()

    def step(self, cell: BenchCell, bench: str, kind: str, score: Optional[float]) -> None:
        self.done += 1
        self.spent += cell.prompt_tokens * cell.num_prompts
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.spent * (self.todo - self.spent) if self.spent else 0.0
        logger.info("[suite] %d/%d %s %s on %s: score %s | elapsed %s, ETA %s", self.done, self.total, bench,
                    cell.key, kind, "-" if score is None else f"{score:.2f}", _format_seconds(elapsed),
                    _format_seconds(eta))


def run_suite(config: SuiteConfig, out_dir: str, pool: BackendPool,
              benchmarks: Optional[dict[str, Benchmark]] = None) -> dict:
    """Run every benchmark's missing cells; write the results JSON and the markdown table (writer
    only). `benchmarks` overrides building them from config (tests)."""
    benches = benchmarks if benchmarks is not None else {n: make(n, o) for n, o in config.benchmarks.items()}
    plan = {name: [(c, route(c, config.hf_max_tokens)) for c in b.cells()] for name, b in benches.items()}
    kinds = sorted({k for cells in plan.values() for _, k in cells}, key=["megatron", "hf"].index)
    runners: dict[tuple[str, str], GridRunner] = {}
    for kind in kinds:  # Megatron first: every rank takes part; then HF cells on the writer
        if not pool.available(kind):
            continue
        backend, tokenizer = pool.get(kind)
        for name, b in benches.items():
            if any(k == kind for _, k in plan[name]):
                header = {"suite": b.header(), "identity": run_identity(backend, tokenizer)}
                runners[(name, kind)] = GridRunner(os.path.join(out_dir, "suite", f"{name}_{kind}_cells.jsonl"),
                                                   header, backend, f"{name}/{kind}", log=False)
    all_cells = [(n, c, k) for n, cells in plan.items() for c, k in cells]
    done = [(n, c, k) for n, c, k in all_cells if (n, k) in runners and c.key in runners[(n, k)].done]
    todo_cost = sum(c.prompt_tokens * c.num_prompts for n, c, k in all_cells
                    if (n, k) in runners and c.key not in runners[(n, k)].done)
    progress = _Progress(todo_cost, len(all_cells), len(done))
    if done:
        logger.info("[suite] resuming from %s: %d of %d cells already done", out_dir, len(done), len(all_cells))
    results: dict[str, dict[str, dict]] = {n: {} for n in benches}
    for kind in kinds:
        for name, b in benches.items():
            if (name, kind) not in runners:
                continue
            backend, tokenizer = pool.get(kind)
            mine = [c for c, k in plan[name] if k == kind]
            by_key = {c.key: c for c in mine}

            def compute(cell: Cell, b=b, name=name, kind=kind, backend=backend, tokenizer=tokenizer) -> dict:
                res = b.run_cell(by_key[cell.key], backend, tokenizer)
                progress.step(by_key[cell.key], name, kind, res.get("score"))
                return res

            grid = [Cell(c.key, float(c.prompt_tokens * c.num_prompts), c.label) for c in mine]
            for c, res in zip(mine, runners[(name, kind)].run(grid, compute)):
                results[name][c.key] = res
    if not pool.is_writer:
        return {}
    return write_report(config, benches, results, plan, out_dir, runners)


def write_report(config: SuiteConfig, benches: dict, results: dict, plan: dict, out_dir: str,
                 runners: dict) -> dict:
    """suite_results.json and suite_table.md from the finished cells."""
    row: dict[str, float] = {}
    report: dict[str, Any] = {"model_name": config.model_name, "hf_max_tokens": config.hf_max_tokens,
                              "benchmarks": {}, "paper": PAPER, "published": PUBLISHED}
    for name, b in benches.items():
        agg = b.aggregate(results[name])
        row.update(agg)
        missing = [c.key for c, _ in plan[name] if c.key not in results[name]]
        entry = {"aggregates": agg, "cells_total": len(plan[name]), "cells_done": len(results[name]),
                 "missing": missing, "cells": {k: {x: v for x, v in r.items() if x in ("score", "nulls")}
                                               for k, r in results[name].items()}}
        if hasattr(b, "finish") and results[name]:
            b.finish(results[name], out_dir)
        report["benchmarks"][name] = entry
    report["row"] = row
    report["identity"] = {f"{n}/{k}": r.header["identity"] for (n, k), r in runners.items()}
    report["json_path"] = write_json(os.path.join(out_dir, "suite_results.json"), report)
    report["table_path"] = _write_table(os.path.join(out_dir, "suite_table.md"), config.model_name, row)
    return report


def markdown_table(model_name: str, row: dict[str, float]) -> str:
    """The paper's layout: one row per model, the evaluated one first, published rows below."""
    cols = [c for c in COLUMN_ORDER if c in row or any(c in r for r in PUBLISHED.values())]
    cols += [c for c in row if c not in cols]

    def fmt(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
             f"| **{model_name}** (this run) | " + " | ".join(fmt(row.get(c)) for c in cols) + " |"]
    lines += [f"| {name} | " + " | ".join(fmt(vals.get(c)) for c in cols) + " |" for name, vals in PUBLISHED.items()]
    lines.append("")
    lines.append(f"Published rows: {PAPER} (Tables 1, 3, 4); \"–\": not reported there or not run here. "
                 "RULER <L: mean over tasks at each length, then over the lengths up to L.")
    return "\n".join(lines) + "\n"


def _write_table(path: str, model_name: str, row: dict) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown_table(model_name, row))
    os.replace(tmp, path)
    return path
