"""Needle-in-a-haystack grid: context lengths x needle depths -> scores, results.json, heatmap.png.

The default needle is the passkey of the UltraLong paper's NIAH evaluation (arXiv:2504.06214; template from
LongLoRA/InfiniteBench): " The pass key is {value}. Remember it. {value} is the pass key.",
asked for with the answer prefix "The pass key is" so a base model completes the number. Every
cell is `samples_per_cell` prompts (different passkeys and filler offsets by seed), scored by
substring match (`scoring.py`), greedy decoding. Cost: one full prefill per sample, so a 10 x 10
grid at 1M is 100 million-token prefills (Fu et al.'s 40 x 10 up to 128K took ~24 h on 4 A100s,
Fu et al. 2024, arXiv:2402.10171); start coarse. Decoding is KV-cached on both backends, so the
few answer tokens cost little next to the prefill.

The grid runs through `grid.GridRunner`: each finished cell is appended to
`<out>/niah_cells.jsonl`, a re-run with the same --out resumes, and progress lines give cell i/N,
elapsed time and ETA.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from megatron_ultralong.eval.backends import Backend
from megatron_ultralong.eval.identity import run_identity
from megatron_ultralong.eval.grid import OVER_LENGTH_POLICIES, Cell, GridRunner, OverLength, check_length
from megatron_ultralong.eval.haystack import HAYSTACK_KINDS, Haystack
from megatron_ultralong.eval.report import save_heatmap, write_json
from megatron_ultralong.eval.scoring import SCORERS, score
from megatron_ultralong.eval.tasks import Sample, answer_budget, random_number, sample_seed
from megatron_ultralong.eval.tokenizer import EvalTokenizer


@dataclass(frozen=True)
class NiahConfig:
    """How each NIAH prompt is built and scored (the grid itself is run_niah's arguments)."""

    haystack: str = "essay"
    """Filler: "essay" (the essays in eval/data) or "noise" (RULER's repeated sentence)."""

    prefix: str = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it.\n\n"
    )
    """Text before the haystack."""

    needle: str = " The pass key is {value}. Remember it. {value} is the pass key."
    """Needle template; {value} is the answer. Leading space: it follows a sentence end."""

    question: str = "\n\nWhat is the pass key? The pass key is"
    """Text after the haystack: question plus answer prefix (no chat template: base models too)."""

    value_digits: int = 7
    """Digits of the random passkey."""

    samples_per_cell: int = 1
    """Prompts per (length, depth) cell; the cell's score is their mean."""

    max_new_tokens: Optional[int] = None
    """Greedy decoding budget per prompt; None: the passkey's tokens + a margin (`tasks.answer_budget`)."""

    over_length: OverLength = "warn"
    """When prompt + new tokens exceed the model's max_position_embeddings: "warn" (evaluate anyway:
    probing past the trained length is what the heatmap is for) or "refuse" (ValueError)."""

    snap_to_sentence: bool = True
    """Move each needle back to the sentence boundary before its requested depth (as gkamradt's
    NIAH does); the depth actually used is recorded per sample."""

    scorer: str = "all"
    """"all"/"part" (substring) or "exact" (`scoring.py`)."""

    seed: int = 0
    """Base seed for passkeys; each sample's seed derives from (seed, length, depth, index)."""

    def __post_init__(self) -> None:
        if self.haystack not in HAYSTACK_KINDS:
            raise ValueError(f"NiahConfig.haystack={self.haystack!r}: expected one of {HAYSTACK_KINDS}")
        if "{value}" not in self.needle:
            raise ValueError(f"NiahConfig.needle={self.needle!r}: must contain '{{value}}'")
        if self.scorer not in SCORERS:
            raise ValueError(f"NiahConfig.scorer={self.scorer!r}: expected one of {SCORERS}")
        for name in ("value_digits", "samples_per_cell", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"NiahConfig.{name}={getattr(self, name)}: expected >= 1")
        if self.over_length not in OVER_LENGTH_POLICIES:
            raise ValueError(f"NiahConfig.over_length={self.over_length!r}: expected one of {OVER_LENGTH_POLICIES}")


@dataclass(frozen=True)
class NiahResults:
    """What `run_niah` produced. Paths are None on processes that do not write (non-zero ranks)."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    scores: tuple[tuple[float, ...], ...]
    """Mean score per cell, [len(depths)][len(lengths)], in [0, 1]."""

    samples: tuple[dict, ...] = field(repr=False)
    """One record per prompt: length, depths, needle position, answer, prediction, score, seconds."""

    json_path: Optional[str] = None
    heatmap_path: Optional[str] = None

    @property
    def mean_score(self) -> float:
        cells = [s for row in self.scores for s in row]
        return sum(cells) / len(cells)


def check_grid(lengths: Sequence[int], depths: Sequence[float]) -> None:
    """ValueError naming --lengths / --depths for an empty or invalid grid."""
    if not lengths or any(int(n) != n or n < 1 for n in lengths):
        raise ValueError(f"--lengths {list(lengths)}: expected positive integers")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths {list(depths)}: expected fractions in [0, 1] (e.g. 0 0.25 0.5 1)")
    for flag, values in (("--lengths", lengths), ("--depths", depths)):
        if len(set(values)) != len(values):
            raise ValueError(f"{flag} {list(values)}: repeated values")


def make_niah_sample(tokenizer: EvalTokenizer, haystack: Haystack, cfg: NiahConfig, length: int,
                     depth: float, index: int) -> Sample:
    """The index-th passkey prompt of exactly `length` tokens with the needle at `depth`."""
    rng = random.Random(sample_seed("niah", cfg.seed, length, depth, index))
    value = random_number(rng, cfg.value_digits)
    prompt = haystack.build_prompt(
        length,
        [(depth, tokenizer.encode(cfg.needle.format(value=value)))],
        prefix=tokenizer.encode(cfg.prefix),
        suffix=tokenizer.encode(cfg.question),
        snap_to_sentence=cfg.snap_to_sentence,
    )
    budget = cfg.max_new_tokens if cfg.max_new_tokens is not None else answer_budget(tokenizer, (value,))
    return Sample("niah", prompt, (value,), budget, cfg.scorer)


def run_sample(backend: Backend, tokenizer: EvalTokenizer, sample: Sample) -> dict:
    """Greedy-decode one sample and score it; returns its record (needle positions included).

    A sample with `questions` is answered with `backend.generate_many` (the context prefilled once);
    its prediction joins the answers by newlines and its score is the mean over questions."""
    t0 = time.perf_counter()
    if sample.questions:
        outs = backend.generate_many(sample.prompt.ids[: sample.context_len], [q.suffix for q in sample.questions],
                                     sample.max_new_tokens, tokenizer.stop_ids)
        answers = [tokenizer.decode(out) for out in outs]
        prediction = "\n".join(answers)
        value = sum(score(a, q.answers, sample.scorer) for a, q in zip(answers, sample.questions)) / len(answers)
        generated = sum(len(out) for out in outs)
    else:
        out = backend.generate(sample.prompt.ids, sample.max_new_tokens, tokenizer.stop_ids)
        prediction, generated = tokenizer.decode(out), len(out)
        value = score(prediction, sample.answers, sample.scorer)
    return {
        "task": sample.task,
        "length": len(sample.prompt.ids),
        "needles": [
            {"start": n.start, "num_tokens": len(n.ids), "requested_depth": n.requested_depth, "depth": n.depth}
            for n in sample.prompt.needles
        ],
        "answers": list(sample.answers),
        "prediction": prediction,
        "generated_tokens": generated,
        "score": value,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def run_niah(
    backend: Backend,
    tokenizer: EvalTokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    out_dir: Optional[str],
    config: NiahConfig = NiahConfig(),
    title: str = "Needle in a haystack",
    log: bool = True,
    trained_length: Optional[int] = None,
    haystack: Optional[Haystack] = None,
) -> NiahResults:
    """Run the grid and, if `out_dir` and backend.is_writer, write niah_results.json and
    niah_heatmap.png there. Every rank of a distributed backend must call this with the same
    arguments (prompts are deterministic, the backend's forward is a collective).

    Cells finished by an earlier run into the same out_dir are reused (niah_cells.jsonl);
    trained_length draws a vertical line on the heatmap at the model's original context length.
    `haystack` replaces the filler named by config.haystack (a task's own text, e.g. the demo's
    synthetic documents: `Haystack(tokenizer, "custom", text=...)`)."""
    check_grid(lengths, depths)
    haystack = haystack if haystack is not None else Haystack(tokenizer, config.haystack)
    budget = config.max_new_tokens or answer_budget(tokenizer, ("9" * config.value_digits,))
    for length in lengths:
        check_length(int(length), budget, getattr(backend, "max_position_embeddings", None), config.over_length)
    runner = GridRunner(None if out_dir is None else os.path.join(out_dir, "niah_cells.jsonl"),
                        {"task": "niah", "config": asdict(config),
                         "identity": run_identity(backend, tokenizer)}, backend, "niah", log=log)
    # Length-major order: all depths of the shortest length first (the heatmap fills column by column).
    grid = {f"length={int(n)}/depth={float(d)}": (int(n), float(d)) for n in lengths for d in depths}
    cells = [Cell(key, float(n) * config.samples_per_cell, f"length {n} depth {100 * d:.1f}%")
             for key, (n, d) in grid.items()]

    def compute(cell: Cell) -> dict:
        length, depth = grid[cell.key]
        recs = []
        for k in range(config.samples_per_cell):
            rec = run_sample(backend, tokenizer, make_niah_sample(tokenizer, haystack, config, length, depth, k))
            rec["requested_depth"] = depth
            recs.append(rec)
        return {"score": sum(r["score"] for r in recs) / len(recs), "samples": recs}

    results = runner.run(cells, compute, lambda r: f"score {r['score']:.2f} pred={r['samples'][-1]['prediction']!r}")
    records: list[dict] = []
    scores = [[0.0] * len(lengths) for _ in depths]
    for c, res in enumerate(results):
        j, i = divmod(c, len(depths))
        scores[i][j] = res["score"]
        records.extend(res["samples"])
    result = NiahResults(tuple(int(n) for n in lengths), tuple(float(d) for d in depths),
                         tuple(tuple(row) for row in scores), tuple(records))
    if out_dir is None or not backend.is_writer:
        return result
    json_path = write_json(os.path.join(out_dir, "niah_results.json"), {
        "config": asdict(config),
        "lengths": list(result.lengths),
        "depths": list(result.depths),
        "scores": [list(row) for row in result.scores],
        "mean_score": result.mean_score,
        "samples": list(records),
    })
    heatmap = save_heatmap(os.path.join(out_dir, "niah_heatmap.png"), result.scores, result.lengths,
                           result.depths, f"{title} (mean {100 * result.mean_score:.1f}%)", trained_length)
    return NiahResults(result.lengths, result.depths, result.scores, result.samples, json_path, heatmap)
