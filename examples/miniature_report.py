"""Summarise examples/miniature.py results as the markdown tables in docs/evaluation.md.

    python examples/miniature_report.py miniature_out/results.jsonl [more results.jsonl ...]

Tables: NIAH accuracy by arm, CPT step and context length (mean over seeds, with the per-seed
values); accuracy by needle distance (4L and 8L prompts pooled) for the last step of every arm;
filler loss by position block.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

ARMS = {
    "a": "(a) plain RoPE, no CPT",
    "b": "(b) YaRN x4, no CPT",
    "c": "(c) YaRN x4 + upsampled CPT",
    "d": "(d) plain RoPE + upsampled CPT",
    "e": "(e) YaRN x4 + CPT on short docs only",
    "m": "(m) = (c) with the cross-document mask on",
    "s": "(s) (c) at the demo's CPT steps, then SFT (step 0: before SFT)",
}
DISTANCE_BINS = ((0, 64), (64, 128), (128, 192), (192, 256), (256, 384), (384, 520))


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def accuracy_table(rows: list[dict]) -> str:
    groups: dict = defaultdict(dict)
    for r in rows:
        groups[(r["arm"], r["step"])][r["seed"]] = r["accuracy"]
    lengths = sorted({int(k) for r in rows for k in r["accuracy"]})
    out = ["| arm | CPT step | seeds | " + " | ".join(f"{n} ({n // lengths[0]}x)" for n in lengths) + " |",
           "|---|---|---|" + "---|" * len(lengths)]
    for (arm, step), by_seed in sorted(groups.items()):
        cells = []
        for n in lengths:
            vals = [by_seed[s][str(n)] for s in sorted(by_seed)]
            mean = sum(vals) / len(vals)
            cells.append(f"{mean:.2f}" + (f" ({' / '.join(f'{v:.2f}' for v in vals)})" if len(vals) > 1 else ""))
        out.append(f"| {ARMS[arm]} | {step} | {len(by_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def distance_table(rows: list[dict]) -> str:
    last = {}
    for r in rows:
        key = r["arm"]
        if key not in last or r["step"] > last[key]:
            last[key] = r["step"]
    out = ["| arm (last step) | " + " | ".join(f"{lo}-{hi}" for lo, hi in DISTANCE_BINS) + " |",
           "|---|" + "---|" * len(DISTANCE_BINS)]
    for arm in sorted(last):
        hits = defaultdict(list)
        for r in rows:
            if r["arm"] != arm or r["step"] != last[arm]:
                continue
            for _, dist, hit in r["by_distance"]:
                for b in DISTANCE_BINS:
                    if b[0] <= dist < b[1]:
                        hits[b].append(hit)
        cells = [f"{sum(hits[b]) / len(hits[b]):.2f}" if hits[b] else "-" for b in DISTANCE_BINS]
        out.append(f"| {ARMS[arm]} ({last[arm]}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


def chat_table(rows: list[dict]) -> str:
    """Arm s after SFT, asked in its chat format: accuracy by length (mean and per seed)."""
    by_seed = {r["seed"]: r["chat_accuracy"] for r in rows if "chat_accuracy" in r}
    if not by_seed:
        return "(no SFT arm in these results)"
    lengths = sorted({int(k) for acc in by_seed.values() for k in acc})
    cells = []
    for n in lengths:
        vals = [by_seed[s][str(n)] for s in sorted(by_seed)]
        cells.append(f"{sum(vals) / len(vals):.2f} ({' / '.join(f'{v:.2f}' for v in vals)})")
    return ("| after SFT, chat format | seeds | " + " | ".join(f"{n} ({n // lengths[0]}x)" for n in lengths) + " |\n"
            + "|---|---|" + "---|" * len(lengths) + "\n"
            + f"| {ARMS['s']} | {len(by_seed)} | " + " | ".join(cells) + " |")


def loss_table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["arm"], r["step"])].append(r["filler_loss_by_position"])
    n = len(next(iter(groups.values()))[0])
    out = ["| arm | CPT step | " + " | ".join(f"{64 * i}-{64 * (i + 1)}" for i in range(n)) + " |",
           "|---|---|" + "---|" * n]
    for (arm, step), losses in sorted(groups.items()):
        mean = [sum(col) / len(col) for col in zip(*losses)]
        out.append(f"| {ARMS[arm]} | {step} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    rows = load(parser.parse_args().results)
    print("### NIAH accuracy by context length\n\n" + accuracy_table(rows))
    print("\n### Accuracy by needle distance (tokens from the fact to the question; all lengths pooled)\n\n"
          + distance_table(rows))
    print("\n### The SFT arm in its chat format\n\n" + chat_table(rows))
    print("\n### Filler loss (nats/token) by position, 512-token Markov text\n\n" + loss_table(rows))


if __name__ == "__main__":
    main()
