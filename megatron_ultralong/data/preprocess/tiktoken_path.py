"""The tiktoken fast path: rebuild a byte-level BPE tokenizer.json as a tiktoken `Encoding` that
gives the ids HF `tokenizers` gives (`fast_path_proof` proves it for each file before a build).

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
`fast_path_proof` also compares ids on probe texts (special tokens, whitespace runs, digits,
emoji, CJK, combining marks, ...), on a sweep over every code point of planes 0-3 and 14 in
several contexts, and on bounded slices of a sample of the corpus, each time comparing what the
builder will write (tiktoken with exception spans from HF) with HF's ids. Code points that differ
in the sweep, and all code points outside the swept planes (unassigned or private use), are routed
to HF per document.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_ultralong.data.preprocess.bpe_merges import analyse_merges
from megatron_ultralong.data.preprocess.byte_level import bytes_to_unicode
# GPT-2's ByteLevel regex, used when ByteLevel does its own splitting (use_regex=True).
from megatron_ultralong.data.preprocess.pretoken_chunks import GPT2_SPLIT_REGEX

logger = logging.getLogger(__name__)

# The code points `fast_path_proof.SWEPT_RANGES` leaves out (planes 4-13: unassigned as of Unicode
# 16; 15-16: private use): their documents are routed to HF instead of being proven.
UNSWEPT_CLASS = r"\U00040000-\U000DFFFF\U000E1000-\U0010FFFF"


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
    vocab_size: int = 0
    """HF's `get_vocab_size(with_added_tokens=True)`: vocabulary entries plus added tokens that
    are not one (what the builder's token dtype is chosen from, as preprocess_data.py does)."""

    def token_id(self, token: str) -> Optional[int]:
        """HF's `token_to_id`: a special token's id, or a vocabulary entry's, the entry spelled in
        the byte-level alphabet as tokenizer.json spells it; None if neither."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.ranks.get(token.translate(_TO_LATIN1).encode("latin-1"))
        except UnicodeEncodeError:
            return None


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
                         added_names=tuple(plain_added), routed=routed,
                         vocab_size=len(vocab) + sum(1 for s in specials if s not in vocab)), []


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


