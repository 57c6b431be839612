"""Build statistics: fixed-size accumulators and the JSON/Markdown report (the histogram's PNG:
`length_plot`).

Everything here is O(domains x buckets) in memory, whatever the corpus size: per-document numbers
are folded into counters as they stream past and never kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np

# Histogram bins: 8 per octave from 1 token to 2^26 (64M) tokens.
HIST_EDGES = np.unique(np.round(2.0 ** np.arange(0, 26.001, 0.125)).astype(np.int64))


def bucket_names(edges: Sequence[int]) -> List[str]:
    """Readable names of the report's length buckets, e.g. "<1K", "1K-4K", ">=1M"."""

    def k(n: int) -> str:
        for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
            if n >= size and n % size == 0:
                return f"{n // size}{unit}"
        return str(n)

    names = [f"<{k(edges[0])}"]
    names += [f"{k(a)}-{k(b)}" for a, b in zip(edges[:-1], edges[1:])]
    return names + [f">={k(edges[-1])}"]


@dataclass
class LengthStats:
    """Documents and tokens per (domain, length bucket), plus a token-weighted length histogram."""

    domains: List[str]
    edges: np.ndarray
    docs: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)
    hist_tokens: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n_buckets = len(self.edges) + 1
        self.docs = np.zeros((len(self.domains), n_buckets), dtype=np.int64)
        self.tokens = np.zeros((len(self.domains), n_buckets), dtype=np.int64)
        self.hist_tokens = np.zeros(len(HIST_EDGES) + 1, dtype=np.int64)

    def add(self, domain_ids: np.ndarray, lengths: np.ndarray, copies: np.ndarray | None = None) -> None:
        """Fold documents in; `copies` weights each (output side), default 1 (source side)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        copies = np.ones_like(lengths) if copies is None else np.asarray(copies, dtype=np.int64)
        buckets = np.searchsorted(self.edges, lengths, side="right")
        np.add.at(self.docs, (domain_ids, buckets), copies)
        np.add.at(self.tokens, (domain_ids, buckets), copies * lengths)
        np.add.at(self.hist_tokens, np.searchsorted(HIST_EDGES, lengths, side="right"), copies * lengths)

    def as_dict(self) -> Dict[str, Any]:
        names = bucket_names(list(self.edges))
        out: Dict[str, Any] = {}
        for i, d in enumerate(self.domains):
            out[d] = {
                "docs": int(self.docs[i].sum()),
                "tokens": int(self.tokens[i].sum()),
                "buckets": {
                    n: {"docs": int(self.docs[i, b]), "tokens": int(self.tokens[i, b])}
                    for b, n in enumerate(names)
                },
            }
        out["_all"] = {"docs": int(self.docs.sum()), "tokens": int(self.tokens.sum())}
        return out


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _table(title: str, stats: Dict[str, Any], total_tokens: int) -> List[str]:
    domains = [d for d in stats if d != "_all"]
    if not domains:
        return [f"### {title}", "", "(no documents)", ""]
    names = list(stats[domains[0]]["buckets"])
    lines = [f"### {title}", "", "| domain | docs | tokens | share | " + " | ".join(names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for d in domains:
        s = stats[d]
        share = s["tokens"] / total_tokens if total_tokens else 0.0
        cells = [f"{_fmt(s['buckets'][n]['docs'])} / {_fmt(s['buckets'][n]['tokens'])}" for n in names]
        lines.append(f"| {d} | {_fmt(s['docs'])} | {_fmt(s['tokens'])} | {share:.1%} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Bucket cells: docs / tokens (document tokens, separators excluded).", ""]
    return lines


def _budget_table(rows: Dict[str, Any]) -> List[str]:
    """Realised vs target output tokens per domain and length class (affixes included)."""
    domains = [d for d in rows if d != "_all"]
    if not domains:
        return []
    classes = [c for c in rows[domains[0]] if c != "total"]

    def cell(c: Dict[str, Any]) -> str:
        ratio = c["realised_over_target"]
        return f"{_fmt(c['realised'])} / {_fmt(c['target'])}" + (f" ({ratio:.3f})" if ratio else "")

    lines = ["", "### Budget: realised / target tokens (ratio)", "",
             "| domain | " + " | ".join(classes) + " | total |", "|---|" + "---:|" * (len(classes) + 1)]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(cell(rows[d][c]) for c in classes)
                     + f" | {cell(rows[d]['total'])} |")
    lines.append(f"| all | " + " | ".join("" for _ in classes) + f" | {cell(rows['_all']['total'])} |")
    lines += ["", "Targets are the plan's expectation (weights x source tokens); each document's "
              "copies are drawn independently, so realised/target is 1 within ~1/sqrt(documents).", ""]
    return lines


def render_markdown(report: Dict[str, Any]) -> str:
    """Human-readable form of the JSON report."""
    src, out = report["source"], report["output_documents"]
    lines = [f"# Dataset build report: `{report['output']['prefix']}`", ""]
    tok = report["tokenizer"]
    lines += [
        f"- Tokenizer: `{tok['path']}` via **{tok['backend']}**"
        + (f" (fast path refused: {'; '.join(tok['fast_path_reasons'])})"
           if tok.get("fast_path_reasons") else ""),
        f"- Records read: {_fmt(report['input']['records'])} from {report['input']['files']} file(s); "
        f"blank lines: {report['input']['blank_lines']}",
        f"- Skipped: {_fmt(report['skipped']['total'])} "
        + (", ".join(f"{k}: {v}" for k, v in report["skipped"]["by_reason"].items()) or ""),
        f"- Output: {_fmt(report['output']['documents'])} documents, "
        f"{_fmt(report['output']['tokens'])} tokens ({report['output']['dtype']}); budget "
        + (_fmt(report['budget']['total_tokens']) if report['budget']['total_tokens'] else "none")
        + (f", realised/target {report['budget']['realised_over_target']:.4f}"
           if report['budget']['total_tokens'] else ""),
        f"- Separators: {report['separators']['description']}; "
        f"{_fmt(report['separators']['tokens_inserted'])} tokens inserted",
        f"- Throughput: {_fmt(report['timing']['tokenize_tokens_per_s'])} tokens/s tokenizing, "
        f"{report['timing']['total_s']:.1f} s total",
        "",
    ]
    lines += _table("Source (before upsampling)", src, src["_all"]["tokens"])
    lines += _table("Output (after upsampling)", out, out["_all"]["tokens"])
    lines += ["### Sampling plan", "", "| domain | share src -> target | scale | weight short / medium / long |",
              "|---|---|---:|---|"]
    for d, p in report["plan"].items():
        w = p["weights"]
        lines.append(f"| {d} | {p['source_share']:.1%} -> {p['target_share']:.1%} | {p['scale']:.4g} | "
                     f"{w['short']:.4g} / {w['medium']:.4g} / {w['long']:.4g} |")
    lines += _budget_table(report["budget"].get("by_domain_class", {}))
    if report["skipped"]["examples"]:
        lines += ["", "### Skipped records (first few)", ""]
        lines += [f"- {e}" for e in report["skipped"]["examples"]]
    return "\n".join(lines) + "\n"


def write_report(report: Dict[str, Any], json_path: str, md_path: str) -> None:
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
