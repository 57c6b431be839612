"""Cut a long document into pieces at pre-token boundaries, so encoding the pieces one by one and
concatenating the ids gives exactly the ids of the whole document, in bounded memory.

Why: HF `tokenizers` keeps an `Encoding` (ids, offsets, strings, masks: ~100+ bytes a token) for
the whole input, so one 50 MB document costs GBs; BPE never merges across a pre-token boundary,
so pieces cut there encode independently. Neither HF nor tiktoken exposes its pre-token
boundaries cheaply, so the cut points are positions that are a boundary of *every* supported
split regex, proven from the regex's alternatives rather than found by running a third regex
engine over the document:
  - a space between an ASCII letter or digit and an ASCII letter ("abc def"): GPT-2's and
    Llama-3's (cl100k's) alternatives that can contain a space either start with it (` ?\\p{L}+`,
    `[^\\r\\n\\p{L}\\p{N}]?\\p{L}+`) or consist only of whitespace, so the piece before ends at the
    letter/digit and the next one starts at the space;
  - after a newline between two letters ("word\\nWord"): the newline is its own piece in both.
Neither cut point can lie inside a special token unless the token contains a space or a newline
(`SpecialTokenGuard` refuses to cut there). For any other split regex, no cut is made (the whole
document is encoded at once); a document without any such position (one 50 MB word, say) is
encoded whole too.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import regex

GPT2_SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Split regexes whose cut points the module docstring proves (GPT-2; Llama-3 == cl100k).
SUPPORTED_PATTERNS = frozenset({GPT2_SPLIT_REGEX, CL100K_SPLIT_REGEX})
_CUT = regex.compile(r"(?<=[A-Za-z0-9]) (?=[A-Za-z])|(?<=\p{L}\n)(?=\p{L})")
# The same pattern searched backwards (`regex`'s REVERSE flag): the last cut point of a window
# without a match object for every cut point before it.
_CUT_LAST = regex.compile(_CUT.pattern, regex.REVERSE)

# Documents longer than this (characters) are encoded in pieces of about this size.
DEFAULT_PIECE_CHARS = 1 << 18


def can_cut(pattern: Optional[str], special_tokens: Sequence[str] = ()) -> bool:
    """Whether documents of a tokenizer with this split regex and these special-token strings
    may be cut (see the module docstring)."""
    return pattern in SUPPORTED_PATTERNS and not any(
        " " in s or "\n" in s for s in special_tokens)


def iter_pretoken_pieces(text: str, max_chars: int = DEFAULT_PIECE_CHARS) -> Iterator[str]:
    """`text` as consecutive pieces, each cut at a proven boundary near `max_chars` (a piece is
    longer only where no cut point exists), yielded one at a time so that only one piece's copy
    of the text is alive (a list of them would hold a second copy of a 50 MB document). Call only
    when `can_cut` holds."""
    if len(text) <= max_chars:
        yield text
        return
    start = 0
    while len(text) - start > max_chars:
        # The last cut point in the second half of the window, else the first one after it.
        lo, hi = start + max_chars // 2, start + max_chars
        m = _CUT_LAST.search(text, lo, hi)
        cut = m.start() if m is not None else None
        if cut is None:
            m = _CUT.search(text, hi)
            if m is None:
                break
            cut = m.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_at_pretokens(text: str, max_chars: int = DEFAULT_PIECE_CHARS) -> List[str]:
    """All of `iter_pretoken_pieces` as a list."""
    return list(iter_pretoken_pieces(text, max_chars))


def bounded_slices(text: str, pattern: Optional[str], max_chars: int,
                   max_slices: int) -> Iterator[str]:
    """At most `max_slices` whole pre-token-aligned pieces of `text` of about `max_chars` each
    (the equivalence proof compares ids on these instead of whole sample documents)."""
    if len(text) <= max_chars:
        yield text
        return
    if pattern not in SUPPORTED_PATTERNS:
        return  # cannot slice exactly: such a document is not used as a sample
    for i, piece in enumerate(iter_pretoken_pieces(text, max_chars)):
        if i >= max_slices:
            return
        if len(piece) <= 4 * max_chars:
            yield piece
