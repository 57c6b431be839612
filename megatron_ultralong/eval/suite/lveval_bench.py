"""LV-Eval as a suite benchmark: its datasets at its length levels, read by path, generated and
scored as LV-Eval's `prediction.py` and `evaluation.py` do (eval/lveval/), one resumable cell per
chunk of samples of one `<dataset>_<level>` file.

At the end the predictions of every finished file are written in LV-Eval's own layout,
`<out>/lveval/<dataset>_<level>.jsonl` (the rows `prediction.py` writes), so LV-Eval's
`evaluation.py` or `mu-eval-score lveval` re-score them to the same number, plus
`<out>/lveval_results.json`. Columns: "LV-Eval <level>" (mean over the configured datasets) and
the paper's "LV-Eval <128K" (16k-128k) and "LV-Eval <256K" (all five levels), the latter two
only when all 11 datasets ran (arXiv 2504.06214 Tables 1 and 3).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, Optional

from megatron_ultralong.config_io import from_dict
from megatron_ultralong.eval.grid import BenchCell
from megatron_ultralong.eval.jsonl import write_jsonl
from megatron_ultralong.eval.lveval.loader import load_samples, locate
from megatron_ultralong.eval.lveval.metrics import aggregate, sample_scores
from megatron_ultralong.eval.lveval.prompts import DATASETS, LENGTH_WORDS, LENGTHS, MAX_NEW_TOKENS, build_prompt
from megatron_ultralong.eval.lveval.run import predict
from megatron_ultralong.eval.report import write_json
from megatron_ultralong.eval.suite import filebench as fb
from megatron_ultralong.eval.suite.registry import register
from megatron_ultralong.eval.textgen import text_generate
from megatron_ultralong.eval.tokenizer import EvalTokenizer

DOWNLOAD = "wget -c https://huggingface.co/datasets/Infinigence/LVEval/resolve/main/{name}.zip && unzip -o {name}.zip"
"""The fetch command for one dataset, run inside data_root (docs/evaluation.md, LV-Eval)."""

SAMPLES_PER_LEVEL: dict[str, int] = {
    "hotpotwikiqa_mixup": 124, "loogle_SD_mixup": 160, "loogle_CR_mixup": 99, "loogle_MIR_mixup": 139,
    "multifieldqa_en_mixup": 101, "multifieldqa_zh_mixup": 133, "factrecall_en": 200, "factrecall_zh": 200,
    "cmrc_mixup": 200, "lic_mixup": 197, "dureader_mixup": 176,
}
"""Samples in each `<dataset>_<level>` file: the "#Contexts" column of LV-Eval's README
(github.com/infinigence/LVEval, "Overview") divided by its 5 levels. Used by the cost table only;
a run counts the files it reads."""

NOMINAL_TOKENS_PER_WORD = 1.3
"""Cost table only: Llama-3 tokens per word (English) or character (Chinese) of a level's nominal
size. An assumption, not a measurement: LV-Eval states its levels in words, not tokens."""


@dataclass(frozen=True)
class LvevalSuiteConfig:
    """The suite config's `lveval` section."""

    data_root: str
    """Folder holding the downloaded dataset (unzipped `<name>/<name>_<level>.jsonl`, flat files or
    the zips; eval/lveval/loader.py)."""

    datasets: tuple[str, ...] = DATASETS
    """LV-Eval dataset names (default all 11; the paper's columns need all of them)."""

    levels: tuple[str, ...] = LENGTHS
    """Length levels among 16k, 32k, 64k, 128k, 256k."""

    max_length: Optional[int] = None
    """Middle truncation to this many tokens as `prediction.py` does it; None: the whole prompt."""

    model_name: str = ""
    """The name LV-Eval's `build_chat` / `post_process` choose a wrapper by ("" or a Llama-3 name:
    the bare prompt)."""

    limit: Optional[int] = None
    """First n samples of each file (smoke tests; a partial file is not LV-Eval's score)."""

    max_new_tokens: Optional[int] = None
    """Caps every dataset's generation budget (64; factrecall 16); null: LV-Eval's budgets. A cap
    changes the scores: smoke tests only."""

    chunk: int = 8
    """Samples per cell: what a killed run can lose at most."""

    routing_ascii_chars_per_token: float = fb.ROUTING_ASCII_CHARS_PER_TOKEN
    """Routing estimate of prompt tokens (suite/filebench.py estimate_tokens)."""

    def __post_init__(self) -> None:
        bad = [d for d in self.datasets if d not in DATASETS]
        if bad or not self.datasets:
            raise ValueError(f"benchmarks.lveval.datasets {list(self.datasets)}: expected names from {list(DATASETS)}")
        if not self.levels or any(lv not in LENGTHS for lv in self.levels):
            raise ValueError(f"benchmarks.lveval.levels {list(self.levels)}: expected levels from {list(LENGTHS)}")
        if self.chunk < 1 or any(v is not None and v < 1 for v in (self.limit, self.max_new_tokens)):
            raise ValueError("benchmarks.lveval: chunk, limit and max_new_tokens must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"benchmarks.lveval.max_length={self.max_length}: expected >= 2 or null")

    def budget(self, name: str) -> int:
        return min(MAX_NEW_TOKENS[name], self.max_new_tokens or MAX_NEW_TOKENS[name])


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class LvevalBenchmark:
    """The suite's `Benchmark` for LV-Eval (suite/registry.py)."""

    name = "lveval"

    def __init__(self, config: LvevalSuiteConfig):
        self.config = config
        self.index = fb.FileIndex(self._load, self._prompt, config.routing_ascii_chars_per_token)

    @property
    def files(self) -> list[tuple[str, str]]:
        return [(d, lv) for d in self.config.datasets for lv in self.config.levels]

    def _load(self, file_key: str) -> tuple[str, list[dict]]:
        name, level = file_key.rsplit("_", 1)
        return locate(self.config.data_root, name, level), load_samples(self.config.data_root, name, level)

    @staticmethod
    def _prompt(file_key: str, i: int, sample: dict) -> str:
        return build_prompt(file_key.rsplit("_", 1)[0], sample)

    def check_inputs(self) -> None:
        """Read every configured file now; a missing one is a one-line error with its download."""
        for name, level in self.files:
            try:
                self.index.index(f"{name}_{level}", self.config.limit)
            except FileNotFoundError:
                raise fb.missing_file_error("lveval", f"{name}_{level}.jsonl",
                                            f"looked in {self.config.data_root}",
                                            f"cd {self.config.data_root} && " + DOWNLOAD.format(name=name)) from None

    def header(self) -> dict:
        self.check_inputs()
        return {"benchmark": "lveval", "config": asdict(self.config),
                "files": {k: fb.fingerprint(p) for k, p in sorted(self.index.paths.items())},
                "jieba": _version("jieba"), "rouge": _version("rouge")}

    def cells(self) -> list[BenchCell]:
        self.check_inputs()
        c, out = self.config, []
        for name, level in self.files:
            key = f"{name}_{level}"
            for a, b in fb.chunk_ranges(self.index.counts[key], c.chunk):
                longest = max(self.index.longest[key][a:b])
                if c.max_length is not None:
                    longest = min(longest, c.max_length)
                gen = c.budget(name)
                out.append(BenchCell(f"dataset={name}/level={level}/samples={a}-{b}", longest + gen, b - a,
                                     f"LV-Eval {key} samples {a}-{b - 1}", gen))
        return out

    def nominal_cells(self) -> list[BenchCell]:
        """One cell per file at LV-Eval's published sample counts and the level's nominal size in
        tokens (NOMINAL_TOKENS_PER_WORD): the cost table, without the data on disk."""
        c, out = self.config, []
        for name, level in self.files:
            tokens = int(LENGTH_WORDS[level] * NOMINAL_TOKENS_PER_WORD)
            if c.max_length is not None:
                tokens = min(tokens, c.max_length)
            n = SAMPLES_PER_LEVEL[name] if c.limit is None else min(c.limit, SAMPLES_PER_LEVEL[name])
            # prompt_tokens: the input alone here, so the cost table does not prefill the generation
            out.append(BenchCell(f"dataset={name}/level={level}", tokens, n, "", c.budget(name)))
        return out

    def run_cell(self, cell: BenchCell, backend: Any, tokenizer: EvalTokenizer) -> dict:
        p = fb.parse_key(cell.key)
        a, b = fb.samples_range(cell.key)
        name, level = p["dataset"], p["level"]
        samples = self.index.samples(f"{name}_{level}", self.config.limit)[a:b]
        generate = text_generate(backend, tokenizer)
        budget = self.config.budget(name)
        rows = list(predict(lambda prompt, n: generate(prompt, min(n, budget)), tokenizer, samples, name,
                            self.config.max_length, self.config.model_name))
        values = sample_scores(name, [r["pred"] for r in rows], [r["answers"] for r in rows],
                               [r["gold_ans"] for r in rows])
        return {"score": round(fb.pct(values), 2), "values": values, "predictions": rows}

    def _files_done(self, results: dict[str, dict]) -> dict[str, list[dict]]:
        """{"<name>_<level>": the finished cells' results in sample order} for complete files only."""
        by_file: dict[str, list[tuple[int, dict]]] = {}
        for key, res in results.items():
            p = fb.parse_key(key)
            by_file.setdefault(f"{p['dataset']}_{p['level']}", []).append((fb.samples_range(key)[0], res))
        expected: dict[str, int] = {}
        for cell in self.cells():
            p = fb.parse_key(cell.key)
            expected[f"{p['dataset']}_{p['level']}"] = expected.get(f"{p['dataset']}_{p['level']}", 0) + 1
        return {f: [r for _, r in sorted(parts, key=lambda x: x[0])] for f, parts in by_file.items()
                if len(parts) == expected.get(f)}

    def scores(self, results: dict[str, dict]) -> dict[str, dict[str, float]]:
        """{dataset: {level: score}} of the complete files: LV-Eval's round(100 x mean, 2) over all
        samples of the file, the number `evaluation.py` prints for the written file."""
        out: dict[str, dict[str, float]] = {}
        for file_key, parts in self._files_done(results).items():
            name, level = file_key.rsplit("_", 1)
            out.setdefault(name, {})[level] = round(fb.pct([v for r in parts for v in r["values"]]), 2)
        return out

    def aggregate(self, results: dict[str, dict]) -> dict[str, float]:
        scores = self.scores(results)
        cols: dict[str, float] = {}
        for level in self.config.levels:
            have = [scores[d][level] for d in self.config.datasets if level in scores.get(d, {})]
            if len(have) == len(self.config.datasets):
                cols[f"LV-Eval {level}"] = round(sum(have) / len(have), 2)
        paper = aggregate(scores)  # None unless all 11 datasets have the levels the column needs
        for label in ("<128K", "<256K"):
            if paper[label] is not None:
                cols[f"LV-Eval {label}"] = round(paper[label], 2)
        return cols

    def finish(self, results: dict[str, dict], out_dir: str) -> dict:
        """LV-Eval-layout prediction files for the complete files, and lveval_results.json."""
        for file_key, parts in self._files_done(results).items():
            write_jsonl(fb.out_path(out_dir, "lveval", f"{file_key}.jsonl"),
                        [r for p in parts for r in p["predictions"]])
        summary = {"scores": self.scores(results), "aggregate": self.aggregate(results),
                   "config": asdict(self.config)}
        write_json(fb.out_path(out_dir, "lveval_results.json"), summary)
        return summary


@register("lveval")
def _lveval(options: dict) -> LvevalBenchmark:
    return LvevalBenchmark(from_dict(LvevalSuiteConfig, options, "benchmarks.lveval"))
