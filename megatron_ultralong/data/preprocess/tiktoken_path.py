"""The tiktoken fast path: rebuild a byte-level BPE tokenizer.json as a tiktoken `Encoding` and
prove, before it is used, that it gives the ids HF `tokenizers` gives.

Why it can be exact. HF's BPE merges the adjacent pair with the lowest *merge index*; tiktoken
merges the adjacent pair whose concatenation has the lowest *rank*, and emits ranks as ids. With
ranks = HF ids the two agree except on pre-tokens containing an exception that `bpe_merges`
finds from the vocabulary and merges alone (entries their merges do not rebuild, results of
out-of-order merges; see its docstring for the proof), whose spans `exception_routing` encodes
with HF, given that (`structural_check`):
  1. the pre-tokenizer is a regex Split ("Isolated") + ByteLevel without its own regex, or a
     ByteLevel with its GPT-2 regex; no normalizer; the model is plain BPE (no dropout, unk,
     prefix/suffix, byte fallback); `ignore_merges` may be true or false;
  2. the vocab is byte-level and holds all 256 single bytes; every merge uses and makes vocab
     tokens;
  3. added tokens are all special, not normalized, no lstrip/rstrip/single_word, none a
     substring of another.
Tokenizers that fail these are genuinely different (a normalizer rewrites text, byte fallback
and non-byte-level pre-tokenizers have no tiktoken counterpart) and are refused with the reason.

Two things structure does not settle. (a) Ties between two merges making the same token
(`bpe_merges` case 3; Llama-3's own file has many tokens with several splits; transformers'
TikTokenConverter relies on the same). (b) That both regex engines (Oniguruma in `tokenizers`,
fancy-regex in tiktoken) classify every code point alike (\\p{L}, \\p{N}, \\s, case folding). So
`prove_equivalence` also compares ids on probe texts (special tokens, whitespace runs, digits,
emoji, CJK, combining marks, ...), on a sweep over every code point of planes 0-3 and 14 in
several contexts, and on bounded slices of a sample of the corpus, each time comparing what the
builder will write (tiktoken with exception spans from HF) with HF's ids. Code points that differ
in the sweep, and all code points outside the swept planes (unassigned or private use), are routed
to HF per document.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_ultralong.data.dataset_info import file_digest
from megatron_ultralong.data.preprocess.bpe_merges import analyse_merges
from megatron_ultralong.data.preprocess.byte_level import bytes_to_unicode
# GPT-2's ByteLevel regex, used when ByteLevel does its own splitting (use_regex=True).
from megatron_ultralong.data.preprocess.pretoken_chunks import GPT2_SPLIT_REGEX, bounded_slices

logger = logging.getLogger(__name__)

# Planes swept code point by code point; everything else (planes 4-13: unassigned as of Unicode
# 16; 15-16: private use) is routed to HF instead of being proven.
SWEPT_RANGES = ((0x0, 0x40000), (0xE0000, 0xE1000))
UNSWEPT_CLASS = r"\U00040000-\U000DFFFF\U000E1000-\U0010FFFF"
# Contexts for each code point c: after a letter, before/after digits, around spaces, after an
# apostrophe (the case-insensitive contraction branch), before a newline.
SWEEP_CONTEXT = "'{c}a{c}1{c} {c}\n"
# Bumped whenever what the cached proof means changes (3: exceptions routed per pre-token, the
# tainted ids cached with the proof).
PROOF_VERSION = 3

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


@dataclass(frozen=True)
class TiktokenParts:
    """What a tiktoken Encoding is built from (ranks are HF ids)."""

    pat_str: str
    ranks: Dict[bytes, int]
    special_tokens: Dict[str, int]
    added_names: Tuple[str, ...] = ()
    """Added tokens that are plain vocabulary tokens (not in `special_tokens`): a cut may not
    split them either (`pretoken_chunks.can_cut`)."""
    routed: Tuple[bytes, ...] = ()
    """Exception byte strings (`bpe_merges.MergeAnalysis.routed`): the pre-tokens holding one
    are encoded by HF (`exception_routing`)."""


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


class Router:
    """Decides per document whether HF must encode it whole: it contains a code point the proof
    did not cover (`hf_only_chars`, a regex character-class body). Exception strings are routed
    per pre-token instead (`exception_routing`)."""

    def __init__(self, hf_only_chars: str = ""):
        self.text_re = re.compile(f"[{hf_only_chars}]") if hf_only_chars else None

    def needs_hf(self, text: str) -> bool:
        return self.text_re is not None and self.text_re.search(text) is not None


def read_tokenizer_json(path: str) -> Dict[str, Any]:
    """The parsed file (callers must not modify it): parsed once per process and file version,
    since a 128K-vocab tokenizer.json takes ~0.5 s to parse and several steps need it."""
    st = os.stat(path)
    return _read_json(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_json(path: str, size: int, mtime_ns: int) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# GPT-2's byte-level alphabet -> the byte it stands for (as a latin-1 character); every other
# character up to the alphabet's largest becomes one latin-1 cannot encode (not byte-level).
_TO_LATIN1 = {c: 0x400 for c in range(0x144)}
_TO_LATIN1.update({ord(ch): b for b, ch in bytes_to_unicode().items()})


def tiktoken_parts(path: str) -> TiktokenParts:
    """`structural_check(..., check_merges=False)` of a file that passed it, once per process and
    file version (~0.2 s for a 128K vocabulary; the proof, the reference and each backend need it)."""
    st = os.stat(path)
    return _tiktoken_parts(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _tiktoken_parts(path: str, size: int, mtime_ns: int) -> TiktokenParts:
    parts, reasons = structural_check(read_tokenizer_json(path), check_merges=False)
    if parts is None:
        raise ValueError(f"{path}: not tiktoken-equivalent: " + "; ".join(reasons))
    return parts


def hf_tokenizer(path: str, special_tokens_in_text: str):
    """HF `tokenizers.Tokenizer` of a file, loaded once per process, file version and mode
    (~0.5 s of CPU for a 128K vocabulary): `encode_special_tokens` is set from the mode, so each
    mode has its own object and no caller changes another's."""
    st = os.stat(path)
    return _hf_tokenizer(os.path.abspath(path), st.st_size, st.st_mtime_ns, special_tokens_in_text)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: str, size: int, mtime_ns: int, special_tokens_in_text: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    # encode_special_tokens=True treats special-token strings in the text as ordinary text.
    tok.encode_special_tokens = special_tokens_in_text == "ordinary"
    return tok


def _split_pattern(pre: Optional[Dict[str, Any]]) -> Tuple[Optional[str], List[str]]:
    if pre is None:
        return None, ["pre_tokenizer is missing"]
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            return GPT2_SPLIT_REGEX, []
        return None, ["ByteLevel pre_tokenizer without its regex or with add_prefix_space"]
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None, [f"pre_tokenizer is not Split+ByteLevel: {pre.get('type')}"]
    split, byte_level = steps
    pattern = split.get("pattern", {})
    reasons = []
    if "Regex" not in pattern:
        reasons.append("Split pattern is a literal string, not a regex")
    if split.get("behavior") != "Isolated" or split.get("invert"):
        reasons.append("Split behavior is not Isolated (or inverted)")
    if byte_level.get("use_regex", True) or byte_level.get("add_prefix_space", False):
        reasons.append("ByteLevel after Split must have use_regex=false, add_prefix_space=false")
    return (pattern.get("Regex") if not reasons else None), reasons


def split_pattern(data: Dict[str, Any]) -> Optional[str]:
    """The pre-tokenizer's split regex of a tokenizer.json, None if it has no single one."""
    return _split_pattern(data.get("pre_tokenizer"))[0]


def structural_check(
    data: Dict[str, Any], check_merges: bool = True
) -> Tuple[Optional[TiktokenParts], List[str]]:
    """Conditions 1-3 of the module docstring; returns the tiktoken parts or the reasons not.

    check_merges=False skips the merge analysis (~1-2 s for a 128K vocab; worker processes get
    its result from the main process)."""
    reasons: List[str] = []
    model = data.get("model", {})
    if model.get("type") != "BPE":
        return None, [f"model type is {model.get('type')}, not BPE"]
    if data.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
        reasons.append("a normalizer is set")
    pat_str, why = _split_pattern(data.get("pre_tokenizer"))
    reasons += why
    if model.get("dropout") not in (None, 0, 0.0) or model.get("byte_fallback"):
        reasons.append("model uses dropout or byte_fallback")
    if model.get("unk_token") is not None:
        reasons.append(f"model.unk_token={model.get('unk_token')!r}")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        reasons.append("model uses a subword prefix or end-of-word suffix")
    vocab: Dict[str, int] = model.get("vocab", {})
    ranks: Dict[bytes, int] = {}
    for tok, i in vocab.items():
        try:  # str.translate + latin-1: C speed for a 128K vocabulary (a per-character loop: 1 s)
            ranks[tok.translate(_TO_LATIN1).encode("latin-1")] = i
        except UnicodeEncodeError:
            return None, reasons + [f"vocab is not byte-level (token {tok!r})"]
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        reasons.append("vocab lacks some of the 256 byte tokens or has duplicates")
    routed: Tuple[bytes, ...] = ()
    if check_merges and not reasons:
        analysis, why = analyse_merges(model)
        reasons += why
        routed = analysis.routed
    specials: Dict[str, int] = {}
    plain_added: List[str] = []
    for added in data.get("added_tokens", []):
        content = added["content"]
        if content in vocab and vocab[content] == added["id"]:
            plain_added.append(content)
            continue  # an added token that is already a plain vocab token changes nothing
        if not added.get("special") or added.get("normalized") or added.get("lstrip") \
                or added.get("rstrip") or added.get("single_word"):
            reasons.append(f"added token {content!r} is not a plain special token")
        specials[content] = added["id"]
    for a in specials:
        if any(a != b and a in b for b in specials):
            reasons.append(f"special token {a!r} is a substring of another")
            break
    if reasons or pat_str is None:
        return None, reasons
    return TiktokenParts(pat_str=pat_str, ranks=ranks, special_tokens=specials,
                         added_names=tuple(plain_added), routed=routed), []


def build_encoding(data: Dict[str, Any], check_merges: bool = True,
                   parts: Optional[TiktokenParts] = None):
    """tiktoken Encoding for a tokenizer.json that passes `structural_check` (`parts`: its
    result, when the caller already has it)."""
    import tiktoken

    reasons: List[str] = []
    if parts is None:
        parts, reasons = structural_check(data, check_merges)
    if parts is None:
        raise ValueError("tokenizer.json is not tiktoken-equivalent: " + "; ".join(reasons))
    return tiktoken.Encoding(
        name="megatron_ultralong_fast_path",
        pat_str=parts.pat_str,
        mergeable_ranks=parts.ranks,
        special_tokens=parts.special_tokens,
    )


def build_stitched(parts: TiktokenParts, hf, routed: Sequence[bytes], special_tokens_in_text: str,
                   tainted: Optional[Sequence[int]] = None, high_planes: Optional[str] = None):
    """`exception_routing.StitchedEncoder` for the `tiktoken_parts` of a tokenizer.json:
    tiktoken, with the spans around exception pre-tokens encoded by `hf()` (a function returning
    a `tokenizers.Tokenizer` set up with the same `encode_special_tokens`; called when first
    needed, so a file without exceptions never loads HF for it)."""
    from megatron_ultralong.data.preprocess.exception_routing import StitchedEncoder
    from megatron_ultralong.data.preprocess.pretoken_chunks import can_cut

    encoding = build_encoding({}, check_merges=False, parts=parts)
    specials = list(parts.special_tokens) + list(parts.added_names)

    def hf_encode_batch(texts: List[str]) -> List[List[int]]:
        return [e.ids for e in hf().encode_batch(texts, add_special_tokens=False)]

    allowed = "all" if special_tokens_in_text == "special" else set()
    return StitchedEncoder(encoding, hf_encode_batch, parts.ranks, parts.special_tokens, routed,
                           can_cut(parts.pat_str, specials), allowed, tainted, high_planes)


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


@functools.lru_cache(maxsize=8)
def _structure_and_sweep(path: str, digest: str) -> Tuple[Optional[Tuple[str, ...]], Tuple[int, ...], int, Tuple[bytes, ...], Tuple[int, ...]]:
    # Memoised on the file's digest: the merge analysis, the tainted ids and the sweep cost
    # seconds and depend only on the file.
    from tokenizers import Tokenizer

    from megatron_ultralong.data.preprocess.exception_routing import tainted_ids

    data = read_tokenizer_json(path)
    parts, reasons = structural_check(data)
    if parts is None:
        return tuple(reasons), (), 0, (), ()
    hf = Tokenizer.from_file(path)
    hf.encode_special_tokens = True
    tainted = tuple(int(i) for i in tainted_ids(parts.ranks, parts.routed))
    stitched = build_stitched(parts, lambda: hf, parts.routed, "ordinary", tainted)
    bad, swept = _sweep(hf, stitched.encoding, stitched)
    return None, tuple(bad), swept, parts.routed, tainted


def _sweep_key(digest: str) -> str:
    """Cache key: the file, both libraries' versions, and what the proof checks."""
    import tiktoken
    import tokenizers

    what = repr((digest, tokenizers.__version__, tiktoken.__version__, SWEPT_RANGES, SWEEP_CONTEXT,
                 PROOF_VERSION))
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def _cached_structure_and_sweep(path: str, digest: str, cache_dir: Optional[str]):
    """`_structure_and_sweep`, with its result kept as a small JSON file in `cache_dir` (the
    analysis and sweep cost seconds to tens of seconds; the result only depends on the key)."""
    if not cache_dir:
        return _structure_and_sweep(path, digest)
    cache = os.path.join(os.path.expanduser(cache_dir), f"tiktoken_proof_{_sweep_key(digest)}.json")
    try:
        with open(cache, encoding="utf-8") as f:
            reasons, bad, swept, routed, tainted = json.load(f)
        return ((tuple(reasons) if reasons is not None else None), tuple(bad), swept,
                tuple(bytes.fromhex(r) for r in routed), tuple(tainted))
    except (OSError, ValueError):
        pass
    result = _structure_and_sweep(path, digest)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([result[0], list(result[1]), result[2], [r.hex() for r in result[3]],
                   list(result[4])], f)
    os.replace(tmp, cache)
    return result


def prove_equivalence(
    path: str, special_tokens_in_text: str, sample_texts: Sequence[str] = (),
    cache_dir: Optional[str] = None, slice_chars: int = 1 << 16, sample_chars: int = 1 << 18,
) -> Proof:
    """Decide whether the tiktoken path may replace HF for this tokenizer.json (module doc).

    `cache_dir` keeps the structure + merge analysis + sweep result across runs; probes and
    corpus documents are always compared afresh, on slices of at most ~`slice_chars` characters
    cut at pre-token boundaries (a 50 MB sample document must not cost GBs of HF Encodings), and
    at most ~`sample_chars` of them in all: HF encodes them at ~1 MB/s, and on a long-document
    corpus 64 documents x 2 slices cost seconds of start-up for no more assurance than the
    workers' spot checks give across the whole corpus."""
    reasons, bad_cps, swept, routed, tainted = _cached_structure_and_sweep(
        path, file_digest(path), cache_dir)
    if reasons is not None:
        return Proof(ok=False, reasons=reasons)
    if len(bad_cps) > 1000:
        return Proof(ok=False, reasons=(f"{len(bad_cps)} code points differ in the sweep",))
    hf_only = UNSWEPT_CLASS + _code_point_class(bad_cps)

    router = Router(hf_only)
    data = read_tokenizer_json(path)
    hf = hf_tokenizer(path, special_tokens_in_text)
    stitched = build_stitched(tiktoken_parts(path), lambda: hf, routed, special_tokens_in_text,
                              tainted)
    probes = [t for t in PROBE_TEXTS if not router.needs_hf(t)]
    pattern = split_pattern(data)
    corpus, budget = [], sample_chars
    for t in sample_texts:
        for piece in bounded_slices(t, pattern, slice_chars, 2):
            if budget > 0 and not router.needs_hf(piece):
                corpus.append(piece)
                budget -= len(piece)
    texts = probes + corpus
    for start in range(0, len(texts), 64):  # bounded HF Encodings in memory
        chunk = texts[start:start + 64]
        ref = hf.encode_batch(chunk, add_special_tokens=False)
        # What the builder writes: tiktoken, exception spans from HF (None: HF for the text).
        for i, (text, r, got) in enumerate(zip(chunk, ref, stitched.encode_many(chunk)), start):
            if got is not None and got.tolist() != r.ids:
                where = "probe" if i < len(probes) else "corpus document"
                return Proof(ok=False, reasons=(f"ids differ on a {where}: {text[:60]!r}",))
    return Proof(
        ok=True,
        hf_only_chars=hf_only,
        hf_only_strings=routed,
        tainted_ids=tainted,
        mismatched_code_points=bad_cps,
        checks={"code_points_swept": swept, "probe_texts": len(probes),
                "corpus_slices": len(corpus), "routed_strings": len(routed),
                "tainted_ids": len(tainted), **{f"sample_{k}": v for k, v in stitched.counters.items()}},
    )
