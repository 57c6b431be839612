"""RULER as a benchmark: its 13 tasks at several lengths, generated (synthetic.py) and scored
(metrics.py) as RULER does, each (length, task) one resumable grid cell.

The model sees BOS + input + answer prefix (RULER's `call_api.py` sends input + answer_prefix to a
tokenizer that adds BOS) and decodes greedily for the task's `tokens_to_generate`, stopping at EOS.
Predictions are written in RULER's own layout (`<out>/ruler/<length>/<task>.jsonl` with `pred`,
`outputs`, `index`, `others`, `truncation`, `length`, `input`), so RULER's `scripts/eval/
evaluate.py` or `mu-eval-score ruler` re-score them. Aggregates are the paper's (arXiv 2504.06214
Tables 1 and 3): the mean over tasks at each length, then the mean over the lengths up to 128K,
512K, 1M (and 2M, 4M).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Literal, Optional

from megatron_ultralong.eval.grid import BenchCell
from megatron_ultralong.eval.report import format_length, write_json
from megatron_ultralong.eval.ruler import inputs as rin
from megatron_ultralong.eval.ruler.constants import TASKS
from megatron_ultralong.eval.ruler.metrics import RULER_TASK_NAMES, metric_of, score_ruler
from megatron_ultralong.eval.ruler.synthetic import Resources, generate, needs
from megatron_ultralong.eval.scoring import score as strict_score
from megatron_ultralong.eval.tokenizer import EvalTokenizer

RulerScorer = Literal["ruler", "strict"]
AGGREGATE_LIMITS = (131072, 524288, 1048576, 2097152, 4194304)
"""The paper's RULER columns: mean over the lengths up to 128K, 512K, 1M (2M, 4M for those models)."""


@dataclass(frozen=True)
class RulerConfig:
    """What a RULER run evaluates."""

    lengths: tuple[int, ...]
    """Sequence lengths (prompt + tokens_to_generate), in the model's tokens."""

    tasks: tuple[str, ...] = RULER_TASK_NAMES
    """RULER task names (default all 13)."""

    samples: int = 500
    """Samples per task and length (RULER's NUM_SAMPLES in scripts/config_tasks.sh)."""

    seed: int = 42
    """RULER's --random_seed (prepare.py's default)."""

    scorer: RulerScorer = "ruler"
    """"ruler": RULER's string_match_all/part (substring, case-insensitive); "strict": the
    project's whole-token match (eval/scoring.py), which does not credit "1234567" in "12345678"."""

    inputs: rin.RulerInputs = rin.RulerInputs()
    """Paths of RULER's downloaded inputs (essays, SQuAD, HotpotQA, english_words.json)."""

    save_inputs: bool = False
    """Write each prompt into the prediction files' `input` field (RULER does; 4 MB per 1M-token
    prompt). Off: `input` is "" (RULER's evaluator only prints it)."""

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"ruler.tasks {list(self.tasks)}: expected RULER task names from {list(TASKS)}")
        if not self.lengths or any(int(n) < 256 for n in self.lengths):
            raise ValueError(f"ruler.lengths {list(self.lengths)}: expected lengths >= 256 tokens")
        if self.samples < 1:
            raise ValueError(f"ruler.samples={self.samples}: expected >= 1")
        if self.scorer not in ("ruler", "strict"):
            raise ValueError(f"ruler.scorer={self.scorer!r}: expected 'ruler' or 'strict'")


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class RulerBenchmark:
    """The suite's `Benchmark` for RULER (suite/registry.py)."""

    name = "ruler"

    def __init__(self, config: RulerConfig):
        self.config = config
        self.resources = Resources(config.inputs)

    def check_inputs(self) -> None:
        """Load every input the selected tasks need now, so a missing file fails before any model work."""
        for task in self.config.tasks:
            for need in sorted(needs(task)):
                self.resources.get(need)

    def header(self) -> dict:
        c = self.config
        files = {k: rin.file_identity(v) for k, v in asdict(c.inputs).items()}
        return {"benchmark": "ruler", "tasks": list(c.tasks), "samples": c.samples, "seed": c.seed,
                "scorer": c.scorer, "save_inputs": c.save_inputs, "inputs": files,
                "wonderwords": _version("wonderwords"), "nltk": _version("nltk")}

    def cells(self) -> list:
        c = self.config
        return [BenchCell(f"length={int(n)}/task={t}", int(n), c.samples, f"RULER {t} {format_length(int(n))}",
                          TASKS[t].spec.tokens_to_generate)
                for n in sorted(set(int(x) for x in c.lengths)) for t in c.tasks]

    @staticmethod
    def parse(key: str) -> tuple[int, str]:
        length, task = key.split("/")
        return int(length.split("=")[1]), task.split("=")[1]

    def run_cell(self, cell: Any, backend: Any, tokenizer: EvalTokenizer) -> dict:
        length, task = self.parse(cell.key)
        c = self.config
        samples = generate(task, c.samples, length, lambda t: len(tokenizer.encode(t)), self.resources, c.seed)
        ttg = TASKS[task].spec.tokens_to_generate
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        records = []
        for s in samples:
            out = backend.generate(bos + tokenizer.encode(s.prompt), ttg, tokenizer.stop_ids)
            records.append({"index": s.index, "pred": tokenizer.decode(out), "input": s.input if c.save_inputs else "",
                            "outputs": list(s.outputs), "others": {}, "truncation": -1, "length": s.length})
        preds, refs = [r["pred"] for r in records], [r["outputs"] for r in records]
        if c.scorer == "ruler":
            value = score_ruler(task, preds, refs)
        else:
            kind = "all" if metric_of(task) == "string_match_all" else "part"
            value = round(100.0 * sum(strict_score(p, r, kind) for p, r in zip(preds, refs)) / len(preds), 2)
        nulls = sum(not r["pred"].strip() for r in records)
        return {"score": value, "nulls": f"{nulls}/{len(records)}", "predictions": records}

    def scores(self, results: dict[str, dict]) -> dict[str, dict[int, float]]:
        """{task: {length: score}} of the finished cells."""
        out: dict[str, dict[int, float]] = {t: {} for t in self.config.tasks}
        for key, res in results.items():
            length, task = self.parse(key)
            out[task][length] = res["score"]
        return out

    def aggregate(self, results: dict[str, dict]) -> dict[str, float]:
        """Per length "RULER <L>" means over tasks; then the paper's "RULER <128K>"-style means over
        lengths up to each limit (only when that limit is itself among the lengths and all cells up
        to it are finished), and "RULER mean" over all lengths."""
        scores = self.scores(results)
        lengths = sorted(set(int(n) for n in self.config.lengths))
        per_length = {n: sum(scores[t][n] for t in self.config.tasks) / len(self.config.tasks)
                      for n in lengths if all(n in scores[t] for t in self.config.tasks)}
        cols = {f"RULER {format_length(n)}": round(v, 2) for n, v in per_length.items()}
        for limit in AGGREGATE_LIMITS:
            upto = [n for n in lengths if n <= limit]
            if limit in lengths and all(n in per_length for n in upto):
                cols[f"RULER <{format_length(limit)}"] = round(sum(per_length[n] for n in upto) / len(upto), 2)
        if per_length and len(per_length) == len(lengths):
            cols["RULER mean"] = round(sum(per_length.values()) / len(per_length), 2)
        return cols

    def finish(self, results: dict[str, dict], out_dir: str) -> dict:
        """RULER-layout prediction files per length and ruler_results.json; returns the summary."""
        for key, res in results.items():
            length, task = self.parse(key)
            path = os.path.join(out_dir, "ruler", str(length), f"{task}.jsonl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in res["predictions"]:
                    f.write(json.dumps(rec) + "\n")
            os.replace(tmp, path)
        summary = {"tasks": list(self.config.tasks), "lengths": sorted(set(int(n) for n in self.config.lengths)),
                   "samples": self.config.samples, "scorer": self.config.scorer,
                   "scores": {t: {str(n): v for n, v in d.items()} for t, d in self.scores(results).items()},
                   "nulls": {k: r["nulls"] for k, r in results.items()}, "aggregates": self.aggregate(results)}
        summary["json_path"] = write_json(os.path.join(out_dir, "ruler_results.json"), summary)
        return summary


def run_ruler_benchmark(backend: Any, tokenizer: EvalTokenizer, config: RulerConfig, out_dir: Optional[str],
                        over_length: str = "warn", log: bool = True) -> dict:
    """`mu-eval-ruler`: every (length, task) cell through the grid runner (`<out>/ruler_cells.jsonl`,
    resumable), then the prediction files and ruler_results.json (writer only). Returns the summary
    ({"scores", "aggregates", ...}) on the writer, {} elsewhere."""
    from megatron_ultralong.eval.grid import Cell, GridRunner, check_length
    from megatron_ultralong.eval.identity import run_identity

    bench = RulerBenchmark(config)
    bench.check_inputs()
    for n in sorted(set(int(x) for x in config.lengths)):
        check_length(n, 0, getattr(backend, "max_position_embeddings", None), over_length)  # n includes generation
    header = {"suite": bench.header(), "identity": run_identity(backend, tokenizer)}
    runner = GridRunner(None if out_dir is None else os.path.join(out_dir, "ruler_cells.jsonl"), header, backend,
                        "ruler", log=log)
    cells = bench.cells()
    by_key = {c.key: c for c in cells}
    grid = [Cell(c.key, float(c.prompt_tokens * c.num_prompts), c.label) for c in cells]
    got = runner.run(grid, lambda cell: bench.run_cell(by_key[cell.key], backend, tokenizer),
                     lambda r: f"score {r['score']:.2f}")
    results = {c.key: r for c, r in zip(cells, got)}
    if not getattr(backend, "is_writer", True):
        return {}
    if out_dir is None:
        return {"scores": bench.scores(results), "aggregates": bench.aggregate(results)}
    return bench.finish(results, out_dir)
