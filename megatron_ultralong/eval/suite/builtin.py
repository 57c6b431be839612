"""The suite's NIAH and RULER benchmarks (registered on import; suite/registry.py)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_ultralong.config_io import from_dict
from megatron_ultralong.eval.grid import BenchCell
from megatron_ultralong.eval.haystack import Haystack
from megatron_ultralong.eval.niah import NiahConfig, check_grid, make_niah_sample, run_sample
from megatron_ultralong.eval.report import format_length, save_heatmap, write_json
from megatron_ultralong.eval.tasks import ANSWER_MARGIN
from megatron_ultralong.eval.ruler.runner import RulerBenchmark, RulerConfig
from megatron_ultralong.eval.suite.registry import register
from megatron_ultralong.eval.tokenizer import EvalTokenizer


@dataclass(frozen=True)
class NiahSuiteConfig:
    """The suite config's `niah` section."""

    lengths: tuple[int, ...]
    """Prompt lengths in tokens."""

    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Needle depths as fractions of the haystack."""

    prompt: NiahConfig = field(default_factory=NiahConfig)
    """How each prompt is built and scored (eval/niah.py NiahConfig)."""


class NiahBenchmark:
    """Passkey retrieval at every (length, depth): the paper reports 100% everywhere (Figure 1)."""

    name = "niah"

    def __init__(self, config: NiahSuiteConfig):
        check_grid(config.lengths, config.depths)
        self.config = config
        self._haystack: dict[int, Haystack] = {}

    def header(self) -> dict:
        return {"benchmark": "niah", "depths": [float(d) for d in self.config.depths],
                "prompt": asdict(self.config.prompt)}

    def cells(self) -> list[BenchCell]:
        c = self.config
        new = c.prompt.max_new_tokens or c.prompt.value_digits + ANSWER_MARGIN  # tasks.answer_budget's bound
        return [BenchCell(f"length={int(n)}/depth={float(d)}", int(n), c.prompt.samples_per_cell,
                          f"NIAH {format_length(int(n))} depth {100 * d:.0f}%", new)
                for n in c.lengths for d in c.depths]

    def run_cell(self, cell: BenchCell, backend: Any, tokenizer: EvalTokenizer) -> dict:
        length, depth = cell.key.split("/")
        n, d = int(length.split("=")[1]), float(depth.split("=")[1])
        hay = self._haystack.setdefault(id(tokenizer), Haystack(tokenizer, self.config.prompt.haystack))
        recs = [run_sample(backend, tokenizer, make_niah_sample(tokenizer, hay, self.config.prompt, n, d, k))
                for k in range(self.config.prompt.samples_per_cell)]
        return {"score": 100.0 * sum(r["score"] for r in recs) / len(recs), "samples": recs}

    def aggregate(self, results: dict[str, dict]) -> dict[str, float]:
        if len(results) < len(self.cells()):
            return {}
        scores = [r["score"] for r in results.values()]
        return {"NIAH mean": round(sum(scores) / len(scores), 2), "NIAH min": round(min(scores), 2)}

    def finish(self, results: dict[str, dict], out_dir: str) -> None:
        """niah_results.json and the heatmap (depth x length, in [0, 1]) once every cell is done."""
        if len(results) < len(self.cells()):
            return
        c = self.config
        grid = [[results[f"length={int(n)}/depth={float(d)}"]["score"] / 100.0 for n in c.lengths] for d in c.depths]
        write_json(os.path.join(out_dir, "niah_results.json"),
                   {"lengths": list(c.lengths), "depths": list(c.depths), "scores": grid,
                    "samples": [s for r in results.values() for s in r["samples"]]})
        save_heatmap(os.path.join(out_dir, "niah_heatmap.png"), grid, c.lengths, c.depths, "Needle in a haystack",
                     None)


@register("niah")
def _niah(options: dict) -> NiahBenchmark:
    return NiahBenchmark(from_dict(NiahSuiteConfig, options, "benchmarks.niah"))


@register("ruler")
def _ruler(options: dict) -> RulerBenchmark:
    return RulerBenchmark(from_dict(RulerConfig, options, "benchmarks.ruler"))
