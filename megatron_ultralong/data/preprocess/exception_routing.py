"""Merge exceptions routed to HF per pre-token, not per document.

Why this is exact. BPE acts inside one pre-token, and `bpe_merges`' docstring shows that wherever
HF and tiktoken (ranks = HF ids) diverge on a pre-token, tiktoken at the first divergent step
builds a token t that is one of the exceptions `analyse_merges` lists (a not-rebuilt entry or a
late-merge result; tiktoken emitting a whole pre-token t is the same). tiktoken only ever merges,
so t's bytes then lie inside one token of tiktoken's *final* output for that pre-token. Hence:
if no token of tiktoken's output contains an exception's bytes (a "tainted" id, found once from
the vocabulary), tiktoken's ids are HF's on every pre-token of the text (ties between equal merges,
`bpe_merges` case 3, stay with the probes, sweep and corpus sample of the proof). Checking this
costs one table lookup per output id instead of a text search for hundreds of strings.

Where a tainted id appears, the bytes between the nearest proven pre-token boundaries around it
(`pretoken_chunks`: a space between an ASCII letter/digit and an ASCII letter, or a newline
between ASCII letters; boundaries of both regex engines whatever precedes them) are encoded by HF
and stitched between tiktoken's ids for the rest: tiktoken's tokens never cross a pre-token
boundary, so its ids split exactly there, and HF encodes a span cut at pre-token boundaries as it
encodes that span inside the whole text. The span is usually the one word; identical spans repeat
(the same exception word), so their HF ids are cached.

Where the argument does not hold, the whole text goes to HF (the document-level fallback): a split
regex whose boundaries are not proven (`pretoken_chunks.can_cut` false: not GPT-2's or Llama-3's
regex, or a special token containing a space or newline, which a cut could split), and code points
the proof did not cover (`tiktoken_path.Router`: they may be classified differently by the two
regex engines, which moves pre-token boundaries, not just ids inside one).
"""
from __future__ import annotations

import re
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Proven pre-token boundaries (see `pretoken_chunks`), restricted to ASCII so they can be found
# in the UTF-8 bytes directly: the cut is at the match start.
_CUT = re.compile(rb"(?<=[A-Za-z0-9]) (?=[A-Za-z])|(?<=[A-Za-z]\n)(?=[A-Za-z])")
# HF ids of identical spans are kept up to this many distinct spans, then the cache starts over.
SPAN_CACHE_ENTRIES = 1 << 16


def tainted_ids(ranks: Mapping[bytes, int], routed: Sequence[bytes]) -> np.ndarray:
    """Sorted ids of the vocabulary entries whose bytes contain an exception string (exceptions
    are at least 2 bytes long: every single byte is an entry its merges rebuild)."""
    if not routed:
        return np.zeros(0, np.int64)
    by_prefix: Dict[bytes, List[bytes]] = {}
    for e in routed:
        by_prefix.setdefault(e[:2], []).append(e)
    out = []
    for tok, i in ranks.items():
        for k in range(len(tok) - 1):
            cands = by_prefix.get(tok[k:k + 2])
            if cands and any(tok.startswith(e, k) for e in cands):
                out.append(i)
                break
    return np.asarray(sorted(out), dtype=np.int64)


class StitchedEncoder:
    """tiktoken's ids with every span around a tainted id replaced by HF's ids (module doc)."""

    def __init__(self, encoding, hf_encode_batch: Callable[[List[str]], List[List[int]]],
                 ranks: Mapping[bytes, int], special_tokens: Mapping[str, int],
                 routed: Sequence[bytes], can_cut: bool, allowed_special, tainted=None,
                 high_planes: Optional[str] = None):
        """encoding: tiktoken Encoding (ranks = HF ids); hf_encode_batch: texts -> HF id lists
        (no special tokens added, the same `encode_special_tokens` setting); tainted: the
        result of `tainted_ids` if already computed; high_planes: a regex character-class body of
        code points at U+40000 or above (the planes the proof's sweep leaves out): a text holding
        one goes to HF whole. Found from the ids, not by a search over every text: lead bytes
        F1, F2 and F4 are always in such a code point, F3 only sometimes (plane 14 is swept), so
        a token with F3 makes the text be searched."""
        self.encoding = encoding
        self.hf_encode_batch = hf_encode_batch
        self.allowed_special = allowed_special
        self.can_cut = can_cut
        size = 1 + max(list(ranks.values()) + list(special_tokens.values()))
        toks, ids = list(ranks), np.fromiter(ranks.values(), np.int64, len(ranks))
        lens = np.fromiter(map(len, toks), np.int64, len(toks))
        self.byte_len = np.zeros(size, np.int64)
        self.byte_len[ids] = lens
        for s, i in special_tokens.items():
            self.byte_len[i] = len(s.encode("utf-8"))
        # Bit 1: tainted (an exception inside: span to HF); 2: whole text to HF; 4: search text.
        self.flags = np.zeros(size, np.uint8)
        self.flags[tainted_ids(ranks, routed) if tainted is None else np.asarray(tainted, np.int64)] = 1
        self.high_re = re.compile(f"[{high_planes}]") if high_planes else None
        if high_planes:
            blob = np.frombuffer(b"".join(toks), np.uint8)
            owner = np.searchsorted(np.cumsum(lens), np.arange(len(blob)), "right")
            self.flags[ids[owner[(blob == 0xF1) | (blob == 0xF2) | (blob == 0xF4)]]] |= 2
            self.flags[ids[owner[blob == 0xF3]]] |= 4
        self.cache: Dict[bytes, np.ndarray] = {}
        self.counters = {"hf_spans": 0, "hf_span_bytes": 0, "hf_span_cache_hits": 0,
                         "whole_texts_to_hf": 0}
        self.routing_s = 0.0

    def tiktoken_ids(self, text: str) -> np.ndarray:
        ids = self.encoding.encode_to_numpy(text, allowed_special=self.allowed_special,
                                            disallowed_special=())
        return ids.astype(np.int32)  # uint32 from tiktoken; the pool stores int32

    def _spans(self, raw: bytes, ids: np.ndarray, where: np.ndarray) -> Optional[List[Tuple[int, int, int, int]]]:
        """Merged (byte lo, byte hi, first token, end token) spans to encode with HF around the
        tainted tokens at positions `where`; None if a span edge does not fall on a token edge
        (the engines would then disagree on pre-tokens: the caller uses HF for the text)."""
        lens = self.byte_len[ids]
        ends = np.cumsum(lens)
        starts = ends - lens
        # The text's two ends are boundaries too.
        cuts = np.concatenate(([0], proven_cuts(raw), [len(raw)]))
        # The last cut at or before each tainted token's start, the first at or after its end.
        lo = cuts[np.searchsorted(cuts, starts[where], "right") - 1]
        hi = cuts[np.searchsorted(cuts, ends[where], "left")]
        # Merge overlapping or touching spans (lo is non-decreasing along `where`).
        new = np.ones(len(lo), bool)
        new[1:] = lo[1:] >= np.maximum.accumulate(hi)[:-1]  # touching spans stay apart: cacheable
        lo = lo[new]
        hi = np.maximum.reduceat(hi, np.flatnonzero(new))
        i0 = np.searchsorted(starts, lo, "left")
        i1 = np.searchsorted(ends, hi, "left") + 1
        if (i0 >= len(ids)).any() or (starts[np.minimum(i0, len(ids) - 1)] != lo).any() \
                or (ends[i1 - 1] != hi).any():
            return None
        return list(zip(lo.tolist(), hi.tolist(), i0.tolist(), i1.tolist()))

    def encode_many(self, texts: Sequence[str]) -> List[Optional[np.ndarray]]:
        """Stitched ids of each text, or None where the whole text must go to HF instead."""
        out: List[Optional[np.ndarray]] = []
        plans = []
        for text in texts:
            ids = self.tiktoken_ids(text)
            flags = self.flags[ids]
            if not flags.any():
                out.append(ids)
                continue
            t0 = time.perf_counter()
            where = np.flatnonzero(flags & 1)
            spans = None
            whole = (flags & 2).any() or ((flags & 4).any() and self.high_re.search(text))
            if not whole and not len(where):  # a swept plane-14 code point only: nothing to do
                self.routing_s += time.perf_counter() - t0
                out.append(ids)
                continue
            if self.can_cut and not whole:
                raw = text.encode("utf-8", "surrogatepass")
                spans = self._spans(raw, ids, where)
            self.routing_s += time.perf_counter() - t0
            if spans is None:
                self.counters["whole_texts_to_hf"] += 1
                out.append(None)
                continue
            plans.append((len(out), ids, [raw[lo:hi] for lo, hi, _, _ in spans], spans))
            out.append(ids)
        if plans:
            t0 = time.perf_counter()
            self._encode_spans(plans, out)
            self.routing_s += time.perf_counter() - t0
        return out

    def _encode_spans(self, plans, out: List[Optional[np.ndarray]]) -> None:
        todo = sorted({s for _, _, pieces, _ in plans for s in pieces if s not in self.cache})
        if len(self.cache) + len(todo) > SPAN_CACHE_ENTRIES:
            self.cache.clear()
            todo = sorted({s for _, _, pieces, _ in plans for s in pieces})
        if todo:
            for s, ids in zip(todo, self.hf_encode_batch([s.decode("utf-8") for s in todo])):
                self.cache[s] = np.asarray(ids, dtype=np.int32)
        for index, ids, pieces, spans in plans:
            parts, prev = [], 0
            for piece, (_, _, i0, i1) in zip(pieces, spans):
                parts += [ids[prev:i0], self.cache[piece]]
                prev = i1
                self.counters["hf_spans"] += 1
                self.counters["hf_span_bytes"] += len(piece)
            parts.append(ids[prev:])
            out[index] = np.concatenate(parts)
        self.counters["hf_span_cache_hits"] += sum(len(p) for _, _, p, _ in plans) - len(todo)


_ALPHA = np.zeros(256, bool)
_ALPHA[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)] = True
_ALNUM = _ALPHA.copy()
_ALNUM[np.frombuffer(b"0123456789", np.uint8)] = True


def proven_cuts(raw: bytes) -> np.ndarray:
    """Sorted byte offsets of `_CUT`'s matches, vectorised (`_CUT` is the readable definition;
    tests check the two agree): before a space that follows an ASCII letter or digit and precedes
    an ASCII letter, and after a newline between two ASCII letters."""
    b = np.frombuffer(raw, np.uint8)
    if len(b) < 3:
        return np.zeros(0, np.int64)
    inner = b[1:-1]
    # Classify only the spaces and newlines (a gather over all bytes costs 3x more).
    sp = np.flatnonzero(inner == 32) + 1
    sp = sp[_ALNUM[b[sp - 1]] & _ALPHA[b[sp + 1]]]
    nl = np.flatnonzero(inner == 10) + 1
    nl = nl[_ALPHA[b[nl - 1]] & _ALPHA[b[nl + 1]]] + 1
    if not len(nl):
        return sp
    return np.sort(np.concatenate((sp, nl)))  # never equal: a space vs a letter
