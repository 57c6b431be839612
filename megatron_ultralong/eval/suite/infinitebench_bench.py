"""InfiniteBench as a suite benchmark: its tasks from the dataset's `<task>.jsonl` files by path,
prompted, truncated and scored as upstream does it (eval/infinitebench/), one resumable cell per
chunk of samples of one task.

At the end the predictions of every finished task are written in upstream's layout,
`<out>/infinitebench/preds_<task>.jsonl` (`id`, `prediction`, `ground_truth`), so its
`compute_scores.py` or `mu-eval-score infinitebench` re-score them to the same number, plus
`<out>/infinitebench_results.json`. Column: "InfiniteBench", the unweighted mean over the 12
tasks as the paper reports it (arXiv 2504.06214 Table 1), only when all 12 ran.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from megatron_ultralong.config_io import from_dict
from megatron_ultralong.eval.grid import BenchCell
from megatron_ultralong.eval.infinitebench.loader import load_samples
from megatron_ultralong.eval.infinitebench.metrics import average, sample_scores
from megatron_ultralong.eval.infinitebench.prompts import (DEFAULT_TRUNCATE, MAX_NEW_TOKENS, TASKS, PromptSet,
                                                           create_prompt)
from megatron_ultralong.eval.infinitebench.run import predict
from megatron_ultralong.eval.jsonl import write_jsonl
from megatron_ultralong.eval.report import write_json
from megatron_ultralong.eval.suite import filebench as fb
from megatron_ultralong.eval.suite.registry import register
from megatron_ultralong.eval.textgen import text_generate
from megatron_ultralong.eval.tokenizer import EvalTokenizer

DOWNLOAD = ('wget -c "https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench/resolve/main/{task}.jsonl'
            '?download=true" -O {path}')
"""The fetch command for one task file (docs/evaluation.md, InfiniteBench)."""

PUBLISHED_SIZES: dict[str, tuple[int, int]] = {
    "longbook_sum_eng": (103, 171_500), "longbook_qa_eng": (351, 192_600), "longbook_choice_eng": (229, 184_400),
    "longdialogue_qa_eng": (200, 103_600), "longbook_qa_chn": (175, 2_068_600), "code_debug": (394, 114_700),
    "code_run": (400, 75_200), "math_calc": (50, 43_900), "math_find": (350, 87_900), "passkey": (590, 122_400),
    "number_string": (590, 122_400), "kv_retrieval": (500, 89_900),
}
"""task -> (examples, average input tokens): the table of InfiniteBench's README
(github.com/OpenBMB/InfiniteBench, "# Examples", "Avg Input Tokens"; k = 1000). Used by the cost
table only; a run counts the files it reads."""


@dataclass(frozen=True)
class InfiniteBenchSuiteConfig:
    """The suite config's `infinitebench` section."""

    data_root: str
    """Folder holding the downloaded `<task>.jsonl` files."""

    tasks: tuple[str, ...] = TASKS
    """Task names (default all 12; the paper's column needs all of them)."""

    truncate_tokens: Optional[int] = DEFAULT_TRUNCATE
    """Middle truncation to this many tokens, as upstream (128K); null: off, for a model whose
    context holds the whole input."""

    prompt_set: PromptSet = "yarn-mistral"
    """Upstream's prompt set: "yarn-mistral" (its open models) or "gpt4"."""

    model_name: str = ""
    """The name `compute_scores.py` takes (math_calc's parser differs for "gpt4")."""

    limit: Optional[int] = None
    """First n samples of each task (smoke tests; not InfiniteBench's score)."""

    max_new_tokens: Optional[int] = None
    """Caps every task's generation budget (math_calc's is 30000); null: upstream's budgets. A cap
    changes the scores: smoke tests only."""

    chunk: int = 8
    """Samples per cell: what a killed run can lose at most."""

    routing_ascii_chars_per_token: float = fb.ROUTING_ASCII_CHARS_PER_TOKEN
    """Routing estimate of prompt tokens (suite/filebench.py estimate_tokens)."""

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"benchmarks.infinitebench.tasks {list(self.tasks)}: expected names from {list(TASKS)}")
        if self.prompt_set not in ("yarn-mistral", "gpt4"):
            raise ValueError(f"benchmarks.infinitebench.prompt_set={self.prompt_set!r}: expected yarn-mistral or gpt4")
        for key in ("truncate_tokens", "limit", "max_new_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < (2 if key == "truncate_tokens" else 1):
                raise ValueError(f"benchmarks.infinitebench.{key}={getattr(self, key)}: too small")
        if self.chunk < 1:
            raise ValueError("benchmarks.infinitebench.chunk: expected >= 1")

    def budget(self, task: str) -> int:
        return min(MAX_NEW_TOKENS[task], self.max_new_tokens or MAX_NEW_TOKENS[task])


class InfiniteBenchBenchmark:
    """The suite's `Benchmark` for InfiniteBench (suite/registry.py)."""

    name = "infinitebench"

    def __init__(self, config: InfiniteBenchSuiteConfig):
        self.config = config
        self.index = fb.FileIndex(self._load, self._prompt, config.routing_ascii_chars_per_token)

    def _path(self, task: str) -> str:
        return os.path.join(self.config.data_root, f"{task}.jsonl")

    def _load(self, task: str) -> tuple[str, list[dict]]:
        return self._path(task), load_samples(self.config.data_root, task)

    def _prompt(self, task: str, i: int, sample: dict) -> str:
        return create_prompt(sample, task, self.config.prompt_set, f"{self._path(task)}: sample {i}")

    def check_inputs(self) -> None:
        """Read every configured task file now; a missing one is a one-line error with its download."""
        for task in self.config.tasks:
            try:
                self.index.index(task, self.config.limit)
            except FileNotFoundError:
                raise fb.missing_file_error("infinitebench", self._path(task), f"task {task}",
                                            DOWNLOAD.format(task=task, path=self._path(task))) from None

    def header(self) -> dict:
        self.check_inputs()
        return {"benchmark": "infinitebench", "config": asdict(self.config),
                "files": {t: fb.fingerprint(p) for t, p in sorted(self.index.paths.items())}}

    def cells(self) -> list[BenchCell]:
        self.check_inputs()
        c, out = self.config, []
        for task in c.tasks:
            for a, b in fb.chunk_ranges(self.index.counts[task], c.chunk):
                longest = max(self.index.longest[task][a:b])
                if c.truncate_tokens is not None:
                    longest = min(longest, c.truncate_tokens)
                out.append(BenchCell(f"task={task}/samples={a}-{b}", longest + c.budget(task), b - a,
                                     f"InfiniteBench {task} samples {a}-{b - 1}", c.budget(task)))
        return out

    def nominal_cells(self) -> list[BenchCell]:
        """One cell per task at the README's example counts and average input tokens (capped by
        the truncation): the cost table, without the data on disk."""
        c, out = self.config, []
        for task in c.tasks:
            n, tokens = PUBLISHED_SIZES[task]
            if c.truncate_tokens is not None:
                tokens = min(tokens, c.truncate_tokens)
            # prompt_tokens: the input alone here, so the cost table does not prefill the generation
            # (math_calc generates up to 30000 tokens)
            out.append(BenchCell(f"task={task}", tokens, n if c.limit is None else min(n, c.limit), "",
                                 c.budget(task)))
        return out

    def run_cell(self, cell: BenchCell, backend: Any, tokenizer: EvalTokenizer) -> dict:
        task = fb.parse_key(cell.key)["task"]
        a, b = fb.samples_range(cell.key)
        c = self.config
        samples = self.index.samples(task, c.limit)[a:b]
        rows = list(predict(text_generate(backend, tokenizer), tokenizer, samples, task, c.truncate_tokens,
                            c.prompt_set, c.budget(task)))
        for i, row in enumerate(rows):  # predict numbers the chunk from 0; upstream's id is the line
            row["id"] = a + i
        values = sample_scores(task, [r["prediction"] for r in rows], [r["ground_truth"] for r in rows], c.model_name)
        return {"score": fb.pct(values), "values": values, "predictions": rows}

    def _tasks_done(self, results: dict[str, dict]) -> dict[str, list[dict]]:
        """{task: the finished cells' results in sample order} for complete tasks only."""
        parts: dict[str, list[tuple[int, dict]]] = {}
        for key, res in results.items():
            parts.setdefault(fb.parse_key(key)["task"], []).append((fb.samples_range(key)[0], res))
        expected: dict[str, int] = {}
        for cell in self.cells():
            task = fb.parse_key(cell.key)["task"]
            expected[task] = expected.get(task, 0) + 1
        return {t: [r for _, r in sorted(p, key=lambda x: x[0])] for t, p in parts.items() if len(p) == expected.get(t)}

    def scores(self, results: dict[str, dict]) -> dict[str, float]:
        """{task: percent} of the complete tasks: 100 x `compute_scores.get_score` over the whole file."""
        return {t: fb.pct([v for r in parts for v in r["values"]]) for t, parts in self._tasks_done(results).items()}

    def aggregate(self, results: dict[str, dict]) -> dict[str, float]:
        avg = average(self.scores(results))  # None unless all 12 tasks are complete
        return {} if avg is None else {"InfiniteBench": round(avg, 2)}

    def finish(self, results: dict[str, dict], out_dir: str) -> dict:
        """Upstream-layout prediction files for the complete tasks, and infinitebench_results.json."""
        for task, parts in self._tasks_done(results).items():
            write_jsonl(fb.out_path(out_dir, "infinitebench", f"preds_{task}.jsonl"),
                        [r for p in parts for r in p["predictions"]])
        scores = self.scores(results)
        summary = {"scores": scores, "average": average(scores), "config": asdict(self.config)}
        write_json(fb.out_path(out_dir, "infinitebench_results.json"), summary)
        return summary


@register("infinitebench")
def _infinitebench(options: dict) -> InfiniteBenchBenchmark:
    return InfiniteBenchBenchmark(from_dict(InfiniteBenchSuiteConfig, options, "benchmarks.infinitebench"))
