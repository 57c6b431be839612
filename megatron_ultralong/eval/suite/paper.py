"""Published results of UltraLong-8B and its baselines, from Xu et al., "From 128K to 4M:
Efficient Training of Ultra-Long Context Large Language Models" (arXiv 2504.06214), Tables 1, 3
and 4. The suite's table prints them beside the evaluated model's row. Cells the paper's tables
hold but that are not transcribed here are None (printed "–"), never guessed.
"""
from __future__ import annotations

PAPER = "arXiv 2504.06214"

# column name (as the benchmarks' `aggregate` names them) -> value, per published row
PUBLISHED: dict[str, dict[str, float | None]] = {
    "Llama-3.1-8B-Instruct (Table 1)": {"RULER <1M": 61.3, "InfiniteBench": 24.66},
    "Llama-3-8B-Instruct-Gradient-1048k (Table 1)": {"RULER <1M": 77.8, "InfiniteBench": 28.60},
    "ProLong-8B-512k-Instruct (Table 1)": {"RULER <1M": 71.2, "InfiniteBench": 23.54},
    "UltraLong-8B-1M (Table 1)": {"RULER <1M": 79.1, "LV-Eval <256K": 27.0, "InfiniteBench": 32.14},
    "UltraLong-8B-2M (Table 1)": {"RULER <1M": 78.2, "LV-Eval <256K": 28.9, "InfiniteBench": 32.49},
    "UltraLong-8B-4M (Table 1)": {"RULER <1M": 78.0, "LV-Eval <256K": 28.1, "InfiniteBench": 30.38},
    "UltraLong-8B-1M, ablation base (Table 3)": {
        "RULER <128K": 85.63, "RULER <512K": 82.28, "RULER <1M": 80.17, "LV-Eval <128K": 27.60,
        "LV-Eval <256K": 26.40, "InfiniteBench": 26.25},
    "w/o special separator (Table 3)": {
        "RULER <128K": 85.47, "RULER <512K": 81.63, "RULER <1M": 79.15, "LV-Eval <128K": 26.06,
        "LV-Eval <256K": 24.85, "InfiniteBench": 22.75},
    "w/ NTK-aware scaling (Table 3)": {
        "RULER <128K": 86.91, "RULER <512K": 80.27, "RULER <1M": 76.62, "LV-Eval <128K": 22.34,
        "LV-Eval <256K": 21.24, "InfiniteBench": 20.18},
    "two-step 512K -> 1M (Table 4)": {"RULER <1M": 77.52},
}
"""The paper's long-context rows. Table 2 (MMLU, MMLU-Pro, MATH, GSM8K, HumanEval average) is
reported by the lm-eval runner."""

# The paper's column order; columns the run produced but the paper lacks follow.
COLUMN_ORDER = ("NIAH mean", "RULER <128K", "RULER <512K", "RULER <1M", "RULER <2M", "RULER <4M",
                "LV-Eval <128K", "LV-Eval <256K", "InfiniteBench")
