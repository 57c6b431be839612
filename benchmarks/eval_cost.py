"""What a full evaluation table costs: per benchmark and length, the prompts, the tokens, and the
wall time predicted on N GPUs from the project's FLOP model (training/metrics.py).

    python benchmarks/eval_cost.py             # NIAH + RULER 4K..4M, LV-Eval, InfiniteBench; Llama-3.1-8B, 8 GPUs
    python benchmarks/eval_cost.py --suite-config suite.yaml --model llama3.1-8b --gpus 8 --markdown

The cells come from the suite's benchmarks (suite/registry.py), so every registered benchmark in
the config is costed the same way; LV-Eval and InfiniteBench at their published sizes
(`nominal_cells`: sample counts and average input lengths from their READMEs), without the data.
FLOPs: a training token costs forward + backward = 3 forwards,
so a prefill of s tokens is s * training_flops_per_token(cfg, s) / 3 (causal attention over s);
each generated token attends to the whole prompt, twice the causal average, which is
training_flops_per_token(cfg, 2 s) / 3. Time = FLOPs / (GPUs x peak x MFU): prompts up to the
HF limit run one per GPU, longer ones split over all GPUs by CP; both reach the same rate in this
model. Decoding is memory-bound in practice, so its share is a lower bound; it is < 1% of every
row here but InfiniteBench's math_calc (30000 new tokens per prompt). Docs: docs/evaluation.md
("What a full table costs") holds this script's --markdown output.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ultralong.eval.report import format_length  # noqa: E402
from megatron_ultralong.eval.suite.registry import make  # noqa: E402
from megatron_ultralong.eval.suite.runner import SuiteConfig, load_suite_config  # noqa: E402
from megatron_ultralong.model.config import load_model_config  # noqa: E402
from megatron_ultralong.training.metrics import training_flops_per_token  # noqa: E402

POWERS = [4096 << k for k in range(11)]  # 4K .. 4M
DEFAULT = SuiteConfig(benchmarks={
    "niah": {"lengths": POWERS, "depths": [i / 10 for i in range(11)]},
    "ruler": {"lengths": POWERS},  # all 13 tasks, RULER's 500 samples
    "lveval": {"data_root": "data/lveval"},  # 11 datasets x 5 levels, no truncation (not read: nominal sizes)
    "infinitebench": {"data_root": "data/infinitebench"},  # 12 tasks, upstream's 128K truncation
})


def prompt_flops(cfg, prompt_tokens: int, new_tokens: int) -> float:
    """Prefill + decode FLOPs of one prompt (see the module docstring)."""
    return (prompt_tokens * training_flops_per_token(cfg, prompt_tokens)
            + new_tokens * training_flops_per_token(cfg, 2 * prompt_tokens)) / 3.0


def cost_rows(config: SuiteConfig, cfg) -> list[dict]:
    rows: dict = defaultdict(lambda: {"prompts": 0, "prompt_tokens": 0, "new_tokens": 0, "flops": 0.0})
    for name, options in config.benchmarks.items():
        bench = make(name, options)
        # file benchmarks (LV-Eval, InfiniteBench) cost at their published sizes, without the data
        for cell in getattr(bench, "nominal_cells", bench.cells)():
            r = rows[(name, cell.prompt_tokens)]
            r["prompts"] += cell.num_prompts
            r["prompt_tokens"] += cell.num_prompts * cell.prompt_tokens
            r["new_tokens"] += cell.num_prompts * cell.new_tokens
            r["flops"] += cell.num_prompts * prompt_flops(cfg, cell.prompt_tokens, cell.new_tokens)
    return [{"benchmark": b, "length": n, **v} for (b, n), v in rows.items()]


def _length(n: int) -> str:
    """A power of two (the grids' lengths) -> "8K"; any other (a benchmark's average) -> "171,500"."""
    return format_length(n) if n & (n - 1) == 0 else f"{n:,}"


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 360 else f"{s / 60:.1f} min"


def markdown(rows: list[dict], gpus: int, peak: float, mfu: float, limits=(131072, 1048576, 4194304)) -> str:
    rate = gpus * peak * 1e12 * mfu
    out = ["| benchmark | length | prompts | prompt tokens | generated tokens | PFLOP | time on "
           f"{gpus} GPUs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['benchmark']} | {_length(r['length'])} | {r['prompts']:,} | {r['prompt_tokens']:,} | "
                   f"{r['new_tokens']:,} | {r['flops'] / 1e15:,.0f} | {_hours(r['flops'] / rate)} |")
    out.append("")
    for limit in limits:
        for b in sorted({r["benchmark"] for r in rows}):
            sel = [r for r in rows if r["benchmark"] == b and r["length"] <= limit]
            if sel:
                t = sum(r["flops"] for r in sel) / rate
                out.append(f"- {b} up to {format_length(limit)}: {sum(r['prompts'] for r in sel):,} prompts, "
                           f"{sum(r['prompt_tokens'] for r in sel) / 1e9:.2f} B prompt tokens, {_hours(t)}")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite-config", help="suite YAML (default: NIAH 11 depths + RULER 13 tasks x 500, 4K..4M)")
    p.add_argument("--model", default="llama3.1-8b", help="model preset or HF config (default llama3.1-8b)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU bf16 peak (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of peak (training's default assumption)")
    p.add_argument("--markdown", action="store_true", help="print the table docs/evaluation.md holds")
    a = p.parse_args(argv)
    config = load_suite_config(a.suite_config) if a.suite_config else DEFAULT
    rows = cost_rows(config, load_model_config(a.model))
    print(markdown(rows, a.gpus, a.peak_tflops, a.mfu))


if __name__ == "__main__":
    main()
