"""Prove, before a build uses it, that the tiktoken fast path gives HF `tokenizers`' ids for a file.

What structure does not settle (`tiktoken_path`'s docstring: ties between equal merges, and the two
regex engines' classes of every code point) is tested three ways, each comparing what the builder
will write (tiktoken, exception spans from HF) with HF's ids:
  - probe texts (special tokens, whitespace runs, digits, emoji, CJK, combining marks, ...);
  - a sweep over every code point of planes 0-3 and 14 in several contexts; code points that
    differ, and all outside the swept planes, send their documents to HF whole;
  - bounded slices of a sample of the corpus.

The first two and the tiktoken parts themselves depend only on the file's bytes, the special-token
mode, both libraries' versions and this module (`PROOF_VERSION`), so `prove_file` keeps them in
`proof_cache_dir` as one JSON file under a key made of all of those: with a warm cache a build
reads neither the 9 MB tokenizer.json nor loads HF to start (~0.05 s instead of ~0.7 s for a 128K
vocabulary). The corpus sample is the build's own text and is compared afresh every time
(`check_corpus_sample`); the builder runs it beside its workers and, if it fails, tokenizes again
with HF. `prove_equivalence` runs all three in sequence (tests, one-off checks).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ultralong.data.dataset_info import TokenizerIdentity, file_digest, tokenizer_identity
from megatron_ultralong.data.preprocess.pretoken_chunks import bounded_slices
from megatron_ultralong.data.preprocess.tiktoken_path import (
    UNSWEPT_CLASS,
    Router,
    TiktokenParts,
    build_stitched,
    hf_tokenizer,
    read_tokenizer_json,
    structural_check,
)

# Planes swept code point by code point (the rest: `tiktoken_path.UNSWEPT_CLASS`).
SWEPT_RANGES = ((0x0, 0x40000), (0xE0000, 0xE1000))
# Contexts for each code point c: after a letter, before/after digits, around spaces, after an
# apostrophe (the case-insensitive contraction branch), before a newline.
SWEEP_CONTEXT = "'{c}a{c}1{c} {c}\n"
# Bumped whenever what the cached proof means or holds changes (4: the tiktoken parts and the
# probes' verdicts are cached with it).
PROOF_VERSION = 4

PROBE_TEXTS = (
    "Hello world! It's a test; we're sure they'll've done it. I'M LOUD'S'T",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nwindows\r\n\r\n\n   \n\t \n",
    " " * 40 + "x" + "\n" * 9 + "y" + "\t" * 17,
    "digits 1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥ ໑໒໓ Ⅻ ½ ²³ 007",
    "emoji 😀😃🚀👩‍👩‍👧‍👦 🇫🇷 ❤️ 👍🏽 flags and ZWJ sequences",
    "CJK 中文字符测试 日本語のテキスト 한국어 텍스트 漢字かなカナ",
    "accents café naïve Zürich Ångström ǅ ǈ ß ẞ ſ K (Kelvin) Ωmega İstanbul",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 \u0e01\u0e34",
    "RTL: שלום עולם مرحبا بالعالم",
    "specials <|begin_of_text|>inside<|end_of_text|> <|eot_id|>text <s></s> <|unknown|>",
    "code: def f(x):\n    return x**2  # comment\n\tif (a && b) { c++; }\n",
    "punct !!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "mixed a1b2c3 abc123def 12abc ab'cd 'quoted' \"double\" `back`",
    "\u00a0nbsp\u2003em space\u3000ideographic\u200bzero width\ufeffbom\u2028ls\u2029ps",
    "\x00\x01\x07 control \x7f\x85 chars",
    "",
)

def _code_point_class(code_points: Sequence[int]) -> str:
    """Regex character-class body for a set of code points (ranges merged)."""
    out, cps = [], sorted(code_points)
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(f"\\U{cps[i]:08X}" + (f"-\\U{cps[j]:08X}" if j > i else ""))
        i = j + 1
    return "".join(out)


def _sweep(hf, encoding, stitched, chunk: int = 4096, limit: int = 1000) -> Tuple[List[int], int]:
    """Code points whose sweep context encodes differently in HF and the builder's fast path
    (stops once more than `limit` are found: past that the fast path is refused anyway)."""
    cps = [c for lo, hi in SWEPT_RANGES for c in range(lo, hi) if not 0xD800 <= c <= 0xDFFF]
    groups = [cps[i:i + chunk] for i in range(0, len(cps), chunk)]
    bad: List[int] = []
    for start in range(0, len(groups), 8):  # 8 chunks per HF batch: parallel, memory bounded
        batch = groups[start:start + 8]
        texts = ["".join(SWEEP_CONTEXT.format(c=chr(c)) for c in g) for g in batch]
        ref = hf.encode_batch(texts, add_special_tokens=False)
        for group, text, r in zip(batch, texts, ref):
            if encoding.encode_ordinary(text) != r.ids:
                bad += _narrow(hf, encoding, group, stitched)
        if len(bad) > limit:
            break
    return bad, len(cps)


def _narrow(hf, encoding, group: Sequence[int], stitched) -> List[int]:
    """The code points of a failing sweep chunk whose own context differs (batched). A context
    whose difference the exception routing repairs (HF's ids for the spans holding an exception;
    HF for the whole text where spans cannot be cut) is not a regex disagreement."""
    singles = [SWEEP_CONTEXT.format(c=chr(c)) for c in group]
    ref = hf.encode_batch(singles, add_special_tokens=False)
    fast = encoding.encode_ordinary_batch(singles, num_threads=1)
    differ = [(c, s, r.ids) for c, s, r, f in zip(group, singles, ref, fast) if r.ids != f]
    repaired = stitched.encode_many([s for _, s, _ in differ])
    return [c for (c, _, want), got in zip(differ, repaired)
            if got is not None and got.tolist() != want]


@dataclass(frozen=True)
class FileProof:
    """What `prove_file` decided about a tokenizer.json in one special-token mode."""

    ok: bool
    """Structure, sweep and probes passed (the corpus sample is still to be checked)."""
    reasons: Tuple[str, ...] = ()
    """Why not, when not ok."""
    parts: Optional[TiktokenParts] = None
    """The tiktoken parts, exceptions (`parts.routed`) included."""
    tainted_ids: Tuple[int, ...] = ()
    """`exception_routing.tainted_ids` of the exceptions."""
    mismatched_code_points: Tuple[int, ...] = ()
    """Swept code points whose contexts differ (their documents go to HF whole)."""
    checks: Dict[str, int] = field(default_factory=dict)
    """Counts for the build report."""
    identity: Optional[TokenizerIdentity] = None
    """`dataset_info.tokenizer_identity` of the file (its vocabulary hash needs HF loaded)."""

    @property
    def hf_only_chars(self) -> str:
        """Regex character-class body of the code points whose documents go to HF whole."""
        return UNSWEPT_CLASS + _code_point_class(self.mismatched_code_points)


@dataclass(frozen=True)
class Proof:
    """Outcome of `prove_equivalence`, recorded in the build report."""

    ok: bool
    reasons: Tuple[str, ...] = ()
    hf_only_chars: str = ""
    hf_only_strings: Tuple[bytes, ...] = ()
    tainted_ids: Tuple[int, ...] = ()
    mismatched_code_points: Tuple[int, ...] = ()
    checks: Dict[str, int] = field(default_factory=dict)


def _first_difference(path: str, mode: str, proof: FileProof, texts: Sequence[str], what: str,
                      counters: Optional[Dict[str, int]] = None) -> Optional[str]:
    """A reason naming the first text whose builder ids differ from HF's, or None."""
    hf = hf_tokenizer(path, mode)
    stitched = build_stitched(proof.parts, lambda: hf, proof.parts.routed, mode, proof.tainted_ids)
    try:
        for start in range(0, len(texts), 64):  # bounded HF Encodings in memory
            chunk = list(texts[start:start + 64])
            ref = hf.encode_batch(chunk, add_special_tokens=False)
            # What the builder writes: tiktoken, exception spans from HF (None: HF for the text).
            for text, r, got in zip(chunk, ref, stitched.encode_many(chunk)):
                if got is not None and got.tolist() != r.ids:
                    return f"ids differ on a {what}: {text[:60]!r}"
        return None
    finally:
        if counters is not None:
            counters.update(stitched.counters)


def _structure_and_sweep(path: str) -> Dict[str, Any]:
    """The file-only part of the proof (seconds to tens of seconds), as the cache stores it."""
    from tokenizers import Tokenizer

    from megatron_ultralong.data.preprocess.exception_routing import tainted_ids

    parts, reasons = structural_check(read_tokenizer_json(path))
    if parts is None:
        return {"reasons": list(reasons)}
    hf = Tokenizer.from_file(path)
    hf.encode_special_tokens = True
    tainted = tuple(int(i) for i in tainted_ids(parts.ranks, parts.routed))
    stitched = build_stitched(parts, lambda: hf, parts.routed, "ordinary", tainted)
    bad, swept = _sweep(hf, stitched.encoding, stitched)
    identity = tokenizer_identity(path, hf)
    return {"reasons": None, "bad": bad, "swept": swept, "tainted": list(tainted),
            "parts": _parts_to_json(parts), "probes": {},
            "identity": {"vocab_size": identity.vocab_size, "vocab_sha256": identity.vocab_sha256}}


def _parts_to_json(parts: TiktokenParts) -> Dict[str, Any]:
    order = sorted(parts.ranks.items(), key=lambda kv: kv[1])
    return {"pat_str": parts.pat_str, "special_tokens": parts.special_tokens,
            "added_names": list(parts.added_names), "routed": [r.hex() for r in parts.routed],
            "vocab_size": parts.vocab_size, "ids": [i for _, i in order],
            "lengths": [len(t) for t, _ in order],
            "tokens": base64.b64encode(b"".join(t for t, _ in order)).decode("ascii")}


def _parts_from_json(d: Dict[str, Any]) -> TiktokenParts:
    blob = base64.b64decode(d["tokens"])
    ends = np.cumsum(d["lengths"]).tolist()
    starts = [0] + ends[:-1]
    if len(ends) != len(d["ids"]) or (ends and ends[-1] != len(blob)):
        raise ValueError("inconsistent token table")
    ranks = {blob[s:e]: i for s, e, i in zip(starts, ends, d["ids"])}
    return TiktokenParts(pat_str=d["pat_str"], ranks=ranks, special_tokens=dict(d["special_tokens"]),
                         added_names=tuple(d["added_names"]),
                         routed=tuple(bytes.fromhex(r) for r in d["routed"]), vocab_size=int(d["vocab_size"]))


def _cache_key(digest: str) -> str:
    """The file, both libraries' versions, and what the proof checks."""
    import tiktoken
    import tokenizers

    what = repr((digest, tokenizers.__version__, tiktoken.__version__, SWEPT_RANGES, SWEEP_CONTEXT,
                 PROBE_TEXTS, PROOF_VERSION))
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def cache_file(path: str, cache_dir: str, digest: Optional[str] = None) -> str:
    """Where `prove_file` keeps the proof of this tokenizer file (`digest`: its `file_digest`)."""
    digest = digest or file_digest(path)
    return os.path.join(os.path.expanduser(cache_dir), f"tiktoken_proof_{_cache_key(digest)}.json")


@functools.lru_cache(maxsize=8)
def _memo_entry(path: str, digest: str, swept: Tuple[Tuple[int, int], ...]) -> Dict[str, Any]:
    # Without a cache directory: once per process, file contents and swept planes.
    return _structure_and_sweep(path)


def _write_entry(cache: str, entry: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(entry, f)
    os.replace(tmp, cache)


def prove_file(path: str, mode: str, cache_dir: Optional[str] = None) -> FileProof:
    """Structure, merge analysis, sweep and probes of a tokenizer.json in special-token `mode`
    ("ordinary" or "special"), from the cache when it holds them (module docstring)."""
    digest = file_digest(path)
    cache = cache_file(path, cache_dir, digest) if cache_dir else None
    entry = None
    if cache:
        try:
            with open(cache, encoding="utf-8") as f:
                entry = json.load(f)
            parts = _parts_from_json(entry["parts"]) if entry["reasons"] is None else None
            if parts is not None and set(entry["identity"]) != {"vocab_size", "vocab_sha256"}:
                raise ValueError("bad identity")
        except (OSError, ValueError, KeyError, TypeError):
            entry = None  # unreadable or from an older layout: proven again and rewritten
    if entry is None:
        entry = dict(_structure_and_sweep(path) if cache else _memo_entry(path, digest, SWEPT_RANGES))
        parts = _parts_from_json(entry["parts"]) if entry["reasons"] is None else None
        if cache:
            _write_entry(cache, entry)
    if entry["reasons"] is not None:
        return FileProof(ok=False, reasons=tuple(entry["reasons"]))
    bad = tuple(entry["bad"])
    if len(bad) > 1000:
        return FileProof(ok=False, reasons=(f"{len(bad)} code points differ in the sweep",))
    identity = TokenizerIdentity(os.path.abspath(path), file_sha256=digest, **entry["identity"])
    proof = FileProof(ok=True, parts=parts, tainted_ids=tuple(entry["tainted"]), mismatched_code_points=bad,
                      identity=identity)
    router = Router(proof.hf_only_chars)
    probes = [t for t in PROBE_TEXTS if not router.needs_hf(t)]
    if mode not in entry["probes"]:
        entry["probes"][mode] = _first_difference(path, mode, proof, probes, "probe")
        if cache:
            _write_entry(cache, entry)
    checks = {"code_points_swept": entry["swept"], "probe_texts": len(probes),
              "routed_strings": len(parts.routed), "tainted_ids": len(proof.tainted_ids)}
    if entry["probes"][mode] is not None:
        return FileProof(ok=False, reasons=(entry["probes"][mode],))
    return replace(proof, checks=checks)


def check_corpus_sample(path: str, mode: str, proof: FileProof, sample_texts: Sequence[str],
                        slice_chars: int = 1 << 16, sample_chars: int = 1 << 18) -> Tuple[Optional[str], Dict[str, int]]:
    """Compare the builder's ids with HF's on slices of a sample of the corpus: (the reason they
    differ or None, counts for the report). Slices hold at most ~`slice_chars` characters cut at
    pre-token boundaries (a 50 MB sample document must not cost GBs of HF Encodings), at most
    ~`sample_chars` in all: HF encodes them at ~1 MB/s, and more buys no more assurance than the
    workers' spot checks give across the whole corpus."""
    router = Router(proof.hf_only_chars)
    corpus, budget = [], sample_chars
    for t in sample_texts:
        for piece in bounded_slices(t, proof.parts.pat_str, slice_chars, 2):
            if budget > 0 and not router.needs_hf(piece):
                corpus.append(piece)
                budget -= len(piece)
    counters: Dict[str, int] = {}
    reason = _first_difference(path, mode, proof, corpus, "corpus document", counters)
    return reason, {"corpus_slices": len(corpus), **{f"sample_{k}": v for k, v in counters.items()}}


def prove_equivalence(path: str, special_tokens_in_text: str, sample_texts: Sequence[str] = (),
                      cache_dir: Optional[str] = None, slice_chars: int = 1 << 16,
                      sample_chars: int = 1 << 18) -> Proof:
    """Decide whether the tiktoken path may replace HF for this tokenizer.json: `prove_file`, then
    `check_corpus_sample` on `sample_texts`."""
    proof = prove_file(path, special_tokens_in_text, cache_dir)
    if not proof.ok:
        return Proof(ok=False, reasons=proof.reasons)
    reason, counts = check_corpus_sample(path, special_tokens_in_text, proof, sample_texts,
                                         slice_chars, sample_chars)
    if reason is not None:
        return Proof(ok=False, reasons=(reason,))
    return Proof(ok=True, hf_only_chars=proof.hf_only_chars, hf_only_strings=proof.parts.routed,
                 tainted_ids=proof.tainted_ids, mismatched_code_points=proof.mismatched_code_points,
                 checks={**proof.checks, **counts})
