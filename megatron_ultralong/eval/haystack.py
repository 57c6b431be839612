"""Haystacks filled to an exact token length, with needles inserted at exact token depths.

Everything happens in token space. The filler text is tokenized once and repeated as token ids,
needles and templates are tokenized on their own, and the prompt is their concatenation, so

    len(prompt) == context_length                              (exactly, by construction)
    prompt[needle.start : needle.start + len(needle.ids)] == needle.ids

and the depth reported for each needle is the real one: needle.start_in_haystack / haystack_len.
(gkamradt's NIAH also inserts in token space, then decodes and lets the provider re-tokenize, which
shifts lengths by a few tokens (github.com/gkamradt/LLMTest_NeedleInAHaystack); feeding the ids
directly avoids that.)

Filler text repeats once the requested length exceeds it (a few KB here; the NIAH essays repeat past
~150K tokens too). A model cannot answer from the repeated filler, because needles are never in it.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ultralong.eval.tokenizer import EvalTokenizer

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
ESSAY_FILE = os.path.join(DATA_DIR, "essays.txt")
# RULER's "noise" haystack sentence (also InfiniteBench's passkey filler); github.com/NVIDIA/RULER
# scripts/data/synthetic/niah.py.
NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
HAYSTACK_KINDS = ("essay", "noise")
_SENTENCE_ENDS = (".", "!", "?", "\n")


def haystack_text(kind: str) -> str:
    """The filler text for `kind` ("essay": the essays shipped in eval/data; "noise": RULER's)."""
    if kind == "essay":
        with open(ESSAY_FILE, encoding="utf-8") as f:
            return f.read().rstrip("\n") + "\n\n"
    if kind == "noise":
        return NOISE_SENTENCE * 20
    raise ValueError(f"haystack={kind!r}: expected one of {HAYSTACK_KINDS}")


@dataclass(frozen=True)
class PlacedNeedle:
    """Where one needle ended up in a prompt."""

    ids: tuple[int, ...]
    """The needle's token ids (as tokenized on its own)."""

    start: int
    """Index of the needle's first token in the full prompt."""

    requested_depth: float
    """Depth asked for, in [0, 1]: fraction of the haystack tokens before the needle."""

    depth: float
    """Depth actually used: haystack tokens before the needle / haystack length (after snapping)."""


@dataclass(frozen=True)
class Prompt:
    """A prompt in token ids plus the ground truth about it."""

    ids: tuple[int, ...]
    """The full prompt: [BOS] prefix haystack-with-needles suffix. len == the requested length."""

    needles: tuple[PlacedNeedle, ...]
    """Every needle, in prompt order."""

    haystack_len: int
    """Filler tokens in the prompt (needles excluded)."""


class Haystack:
    """Repeating filler for one tokenizer, with its sentence boundaries.

    Tokenizes the filler once; `build_prompt` is then pure list slicing, so a 1M-token haystack
    costs one 1M-element list, not a 1M-token tokenization (RULER's binary search re-tokenizes the
    whole prompt at every step: github.com/NVIDIA/RULER scripts/data/synthetic/niah.py).
    """

    def __init__(self, tokenizer: EvalTokenizer, kind: str = "essay", text: Optional[str] = None):
        self.tokenizer = tokenizer
        self.kind = kind
        self.filler = tuple(tokenizer.encode(text if text is not None else haystack_text(kind)))
        if not self.filler:
            raise ValueError(f"haystack={kind!r}: the filler text tokenizes to nothing")
        # Boundary b means "a sentence ends right before filler token b" (b in [0, period)).
        pieces = tokenizer.decode_each(self.filler)
        period = len(self.filler)
        self.boundaries = sorted(
            {0} | {(i + 1) % period for i, p in enumerate(pieces) if p.rstrip(" ").endswith(_SENTENCE_ENDS)}
        )

    def fill(self, n: int) -> list[int]:
        """The first n filler tokens, repeating the filler as often as needed."""
        period = len(self.filler)
        reps, rest = divmod(n, period)
        return list(self.filler) * reps + list(self.filler[:rest])

    def snap(self, target: int, n: int) -> int:
        """The sentence boundary at or before `target` in a haystack of n tokens (0 if none).

        gkamradt's NIAH walks back to the previous period token; so do we, and the
        resulting depth is reported, not the requested one.
        """
        if target >= n:
            return n
        period = len(self.filler)
        base, offset = divmod(target, period)
        i = bisect.bisect_right(self.boundaries, offset) - 1  # boundaries[0] == 0, so i >= 0
        return base * period + self.boundaries[i]

    def build_prompt(
        self,
        length: int,
        needles: Sequence[tuple[float, Sequence[int]]],
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        snap_to_sentence: bool = True,
    ) -> Prompt:
        """A prompt of exactly `length` tokens: [BOS] prefix (haystack with needles) suffix.

        needles: (depth in [0, 1], token ids) pairs. Depth d puts the needle after round(d * H)
        haystack tokens (H = haystack length), moved back to a sentence boundary if
        `snap_to_sentence`. Needles at the same point keep their given order.
        """
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        fixed = len(bos) + len(prefix) + len(suffix) + sum(len(ids) for _, ids in needles)
        h = length - fixed
        if h < 0:
            raise ValueError(
                f"context length {length} is too short: template and needles alone take {fixed} tokens"
            )
        points = []
        for order, (depth, ids) in enumerate(needles):
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depth {depth}: expected a fraction in [0, 1]")
            if not ids:
                raise ValueError("a needle tokenized to zero tokens")
            target = round(depth * h)
            at = self.snap(target, h) if snap_to_sentence else target
            points.append((at, order, depth, tuple(ids)))
        points.sort()
        hay = self.fill(h)
        out: list[int] = bos + list(prefix)
        placed: list[PlacedNeedle] = []
        cursor = 0
        for at, _, depth, ids in points:
            out.extend(hay[cursor:at])
            cursor = at
            placed.append(PlacedNeedle(ids, len(out), depth, at / h if h else 0.0))
            out.extend(ids)
        out.extend(hay[cursor:])
        out.extend(suffix)
        assert len(out) == length, (len(out), length)  # by construction; guards future edits
        return Prompt(tuple(out), tuple(placed), h)
