"""Length-based per-domain upsampling: the policy lives only here.

Policy (Fu et al. 2024 "per-source upsampling"; UltraLong: <4K down, >8K up, 1B tokens):
every document falls in a length class by its token count n,
    short   n <  short_threshold          base weight  short_keep_prob  (<= 1)
    medium  short_threshold <= n < long   base weight  1
    long    n >= long_threshold           base weight  long_factor      (>= 1)
and each domain d gets one scale m_d so that its expected output hits its budget:
    B_d = total_tokens * share_d          share_d = the recipe's, or d's share of source tokens
    E_d = sum_c base_c * (tokens_dc + extra * pieces_dc)     (extra = separator/BOS/EOS tokens)
    m_d = B_d / E_d,   weight_dc = m_d * base_c.
So the recipe sets the *shape* (how much long documents count relative to short ones) and the
budget sets the *size*; with short_keep_prob=0.1, long_factor=1 this is exactly Fu et al.'s
per-source policy (short documents kept with probability 0.1 * m_d, mix kept per source).

A weight w becomes a whole number of copies, floor(w) + [u < w - floor(w)], where u in [0, 1) is
a hash of (seed, document content). No global state and no order dependence: the decision for a
document can be made anywhere, any time, and the same seed gives the same output. The budget is
met in expectation; the report gives the realised count (relative error ~ 1/sqrt(documents)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from megatron_ultralong.data.preprocess.recipe import UpsampleConfig

CLASS_NAMES = ("short", "medium", "long")


def length_classes(lengths: np.ndarray, cfg: UpsampleConfig) -> np.ndarray:
    """Class index (0 short, 1 medium, 2 long) per document length [n] -> [n] uint8."""
    return (np.asarray(lengths) >= cfg.short_threshold).astype(np.uint8) + (
        np.asarray(lengths) >= cfg.long_threshold
    ).astype(np.uint8)


def pieces_per_document(lengths: np.ndarray, cfg: UpsampleConfig) -> np.ndarray:
    """How many output documents each source document becomes (1 unless max_doc_tokens splits)."""
    if cfg.max_doc_tokens is None:
        return np.ones(len(lengths), dtype=np.int64)
    return np.maximum(1, -(-np.asarray(lengths, dtype=np.int64) // cfg.max_doc_tokens))


@dataclass
class ClassTotals:
    """Per (domain, length class) source totals, accumulated chunk by chunk: [domains, 3]."""

    docs: np.ndarray
    tokens: np.ndarray
    pieces: np.ndarray

    @classmethod
    def zeros(cls, n_domains: int) -> "ClassTotals":
        z = lambda: np.zeros((n_domains, 3), dtype=np.int64)  # noqa: E731
        return cls(z(), z(), z())

    def add(self, domain_ids: np.ndarray, lengths: np.ndarray, cfg: UpsampleConfig) -> None:
        classes = length_classes(lengths, cfg)
        np.add.at(self.docs, (domain_ids, classes), 1)
        np.add.at(self.tokens, (domain_ids, classes), lengths.astype(np.int64))
        np.add.at(self.pieces, (domain_ids, classes), pieces_per_document(lengths, cfg))


@dataclass(frozen=True)
class DomainPlan:
    """The sampling decision for one domain, with the numbers that produced it."""

    domain: str
    source_docs: int
    source_tokens: int
    source_share: float
    target_share: float
    target_tokens: float
    base_weights: Tuple[float, float, float]
    scale: float
    weights: Tuple[float, float, float]
    expected_tokens: float


def plan_domains(
    domains: Sequence[str], totals: ClassTotals, cfg: UpsampleConfig, extra_per_piece: int
) -> List[DomainPlan]:
    """Solve m_d per domain (module docstring). Raises ValueError naming the field at fault."""
    source_tokens = totals.tokens.sum(axis=1)
    all_tokens = int(source_tokens.sum())
    if all_tokens == 0:
        raise ValueError("inputs: no documents to sample from (all inputs empty or skipped)")
    base = np.array([cfg.policy(d)[0:1] + (1.0,) + cfg.policy(d)[1:2] for d in domains])
    unit = (base * (totals.tokens + extra_per_piece * totals.pieces)).sum(axis=1)  # E_d at m=1
    given = bool(cfg.domains) and all(p.share is not None for p in cfg.domains.values())
    if given:
        # Validation guarantees every declared domain has a share; others are rejected as unknown.
        shares = np.array([cfg.domains[d].share if d in cfg.domains else 0.0 for d in domains])
    else:
        shares = source_tokens / all_tokens
    budget = float(cfg.total_tokens) if cfg.total_tokens is not None else None
    if budget is None:
        # No budget: with original shares nothing is rescaled; with recipe shares the natural
        # output size sum(E_d) is redistributed.
        budget = float(unit.sum())
    plans = []
    for i, d in enumerate(domains):
        target = budget * shares[i]
        if target > 0 and unit[i] == 0:
            raise ValueError(
                f"upsampling.domains.{d}.share={shares[i]:.4g}: domain {d!r} has no tokens "
                "(all its documents have weight 0 or none were read)"
            )
        if cfg.total_tokens is None and not given:
            scale = 1.0
        else:
            scale = target / unit[i] if unit[i] > 0 else 0.0
        weights = tuple(float(scale * b) for b in base[i])
        plans.append(DomainPlan(
            domain=d,
            source_docs=int(totals.docs[i].sum()),
            source_tokens=int(source_tokens[i]),
            source_share=float(source_tokens[i] / all_tokens),
            target_share=float(shares[i]),
            target_tokens=float(target),
            base_weights=tuple(float(b) for b in base[i]),  # type: ignore[arg-type]
            scale=float(scale),
            weights=weights,  # type: ignore[arg-type]
            expected_tokens=float(scale * unit[i]),
        ))
    return plans


def expected_by_class(plans: Sequence[DomainPlan], totals: ClassTotals, extra_per_piece: int) -> np.ndarray:
    """Target output tokens per (domain, length class), affixes included: [domains, 3]."""
    weights = np.array([p.weights for p in plans], dtype=np.float64).reshape(len(plans), 3)
    return weights * (totals.tokens + extra_per_piece * totals.pieces)


def add_realised(realised: np.ndarray, domain_ids: np.ndarray, lengths: np.ndarray,
                 copies: np.ndarray, cfg: UpsampleConfig, extra_per_piece: int) -> None:
    """Fold written documents into realised output tokens per (domain, class) [domains, 3]."""
    out = copies * (lengths + extra_per_piece * pieces_per_document(lengths, cfg))
    np.add.at(realised, (domain_ids, length_classes(lengths, cfg)), out.astype(np.float64))


def realised_vs_target(domains: Sequence[str], targets: np.ndarray,
                       realised: np.ndarray) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Report rows: per domain and class (and the domain total), target and realised tokens."""

    def cell(t: float, r: float) -> Dict[str, float]:
        return {"target": round(float(t), 1), "realised": int(r),
                "realised_over_target": round(float(r / t), 4) if t > 0 else None}

    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for i, d in enumerate(domains):
        out[d] = {c: cell(targets[i, k], realised[i, k]) for k, c in enumerate(CLASS_NAMES)}
        out[d]["total"] = cell(targets[i].sum(), realised[i].sum())
    out["_all"] = {"total": cell(targets.sum(), realised.sum())}
    return out


def uniform_draws(keys: np.ndarray, seed: int) -> np.ndarray:
    """u in [0, 1) per document from (seed, 64-bit content key): splitmix64's finaliser."""
    z = np.asarray(keys, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def copies_per_document(
    keys: np.ndarray, domain_ids: np.ndarray, lengths: np.ndarray,
    weights: np.ndarray, cfg: UpsampleConfig,
) -> np.ndarray:
    """Number of copies of each document [n]; weights is [domains, 3] from the plans."""
    w = weights[domain_ids, length_classes(lengths, cfg)]
    whole = np.floor(w)
    return (whole + (uniform_draws(keys, cfg.seed) < (w - whole))).astype(np.int64)


def weight_table(plans: Sequence[DomainPlan]) -> np.ndarray:
    """[domains, 3] weights in plan order."""
    return np.array([p.weights for p in plans], dtype=np.float64).reshape(len(plans), 3)


def plans_as_dict(plans: Sequence[DomainPlan]) -> Dict[str, Dict[str, object]]:
    """Report form: per domain, weights named by class."""
    out: Dict[str, Dict[str, object]] = {}
    for p in plans:
        out[p.domain] = {
            "source_docs": p.source_docs,
            "source_tokens": p.source_tokens,
            "source_share": round(p.source_share, 6),
            "target_share": round(p.target_share, 6),
            "target_tokens": round(p.target_tokens, 1),
            "expected_tokens": round(p.expected_tokens, 1),
            "scale": round(p.scale, 6),
            "base_weights": dict(zip(CLASS_NAMES, p.base_weights)),
            "weights": {c: round(w, 6) for c, w in zip(CLASS_NAMES, p.weights)},
        }
    return out


def max_copies(plans: Sequence[DomainPlan]) -> int:
    """Upper bound on copies of any document (ceil of the largest weight)."""
    return int(max((np.ceil(max(p.weights)) for p in plans), default=0))

