"""What a byte-level BPE's vocabulary and merges alone decide about HF `tokenizers` vs tiktoken.

HF's BPE (model H) merges, inside one pre-token, the adjacent pair with the lowest *merge index*;
with `ignore_merges: true` it first emits a pre-token that is itself a vocabulary entry whole.
tiktoken (model T, ranks = HF ids) emits a whole-entry pre-token as one token and otherwise merges
the adjacent pair whose *concatenation* has the lowest rank (ties: leftmost; HF's ties between
equal merges are also leftmost). Run both on the same pre-token from the same bytes; at the first
step where they pick differently, T picks a pair (x, y) with t = x + y, and either
  (1) (x, y) is not a merge. Then t is *not rebuilt*: HF's BPE over t's own bytes does not give
      [t]. Proof: x and y are whole tokens of an HF state, so every merge HF applied inside the
      span of x (of y) was the lowest one inside it; on t's bytes alone HF replays exactly those
      merges in the same relative order. Before x and y are complete, a crossing merge (u, v)
      (u ending x's span, v starting y's) would be the lowest pair in x+y's span on t alone, and
      so also in the word, where nothing outside can remove u or v without crossing x's or y's
      boundary: HF would have applied it, contradiction. So on t alone HF reaches [x, y] and
      stops, since (x, y) is no merge;
  (2) (x, y) is a merge listed *after* the merge HF picks, yet its result has a lower id: t is the
      result of a *late merge* (one listed after a merge making a higher id);
  (3) both picks are merges whose results have the same id (one token, two splits, two places);
or T emits a whole pre-token t that H does not: with `ignore_merges: false`, t is not rebuilt.
In every case the text contains t's bytes. So `analyse_merges` lists the not-rebuilt entries (with
ignore_merges true only those with a split that is not a merge: if every split is a merge, case
(1) cannot arise) and the late-merge results; a document containing any of them is encoded by HF.
Case (3) is not decided here: merging one of two equal-id pairs first can only matter if it
creates a pair ranked below them; the probe texts, the code-point sweep and the corpus sample in
`tiktoken_path.prove_equivalence` test it, as transformers' own TikTokenConverter relies on it.
This needs no `ignore_merges: true` and no closure of the merges under splitting: an HF-trainer
BPE (merges in creation order, ids in creation order) typically has no exception at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from megatron_ultralong.data.preprocess.byte_level import bytes_to_unicode

# More exception strings than this and a large part of the vocabulary would be tainted
# (`exception_routing`): most text would go to HF span by span, so the fast path is refused. The
# per-token check itself costs the same whatever the count (one table lookup per output id).
MAX_ROUTED_STRINGS = 20000


@dataclass(frozen=True)
class MergeAnalysis:
    """Exceptions to HF == tiktoken found from the vocabulary and merges alone."""

    not_rebuilt: Tuple[bytes, ...]
    """Vocabulary entries whose BPE over their own bytes is not the entry itself (and that matter:
    see the module docstring)."""

    late_merges: Tuple[bytes, ...]
    """Results of merges listed after a merge that makes a higher id."""

    closed_under_splitting: bool
    """Every split of every entry into two entries is a merge (TikTokenConverter's layout)."""

    @property
    def routed(self) -> Tuple[bytes, ...]:
        """Byte strings that send a document containing any of them to HF."""
        return tuple(sorted(set(self.not_rebuilt) | set(self.late_merges)))


def merge_pairs(merges: Sequence[Any]) -> List[Tuple[str, str]]:
    # tokenizers < 0.20 writes "a b" strings, newer versions [a, b] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _not_rebuilt(vocab: Dict[str, int], merges: List[Tuple[str, str]]) -> List[str]:
    """Entries that HF's BPE (ignore_merges off, no pre-tokenizer) does not rebuild from bytes:
    the whole vocabulary in one batched, multi-threaded `encode_batch` (~1 s for 128K entries)."""
    from tokenizers import Tokenizer, models

    bpe = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), ignore_merges=False))
    entries = sorted(vocab, key=vocab.get)
    out: List[str] = []
    for start in range(0, len(entries), 16384):  # bounded Encoding objects in memory
        chunk = entries[start:start + 16384]
        for tok, enc in zip(chunk, bpe.encode_batch(chunk, add_special_tokens=False)):
            if enc.ids != [vocab[tok]]:
                out.append(tok)
    return out


def analyse_merges(model: Dict[str, Any]) -> Tuple[MergeAnalysis, List[str]]:
    """The exceptions of a byte-level BPE `model` section, or the reasons it cannot be analysed."""
    vocab: Dict[str, int] = model.get("vocab", {})
    merges = merge_pairs(model.get("merges", []))
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}

    def raw(tok: str) -> bytes:
        return bytes(byte_of[c] for c in tok)

    late: List[str] = []
    pairs = set()
    highest = -1
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b not in vocab:
            return MergeAnalysis((), (), False), [
                f"merge ({a!r}, {b!r}) uses or makes a token outside the vocab"]
        made = vocab[a + b]
        if made < highest:
            late.append(a + b)
        highest = max(highest, made)
        pairs.add((a, b))
    closed = all((tok[:k], tok[k:]) in pairs for tok in vocab for k in range(1, len(tok))
                 if tok[:k] in vocab and tok[k:] in vocab)
    not_rebuilt = _not_rebuilt(vocab, merges)
    if model.get("ignore_merges", False):
        # A whole-entry pre-token is emitted whole by both; only case (1) inside longer words
        # remains, and only for an entry with a split that is not a merge.
        not_rebuilt = [t for t in not_rebuilt if any(
            (t[:k], t[k:]) not in pairs for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)]
    analysis = MergeAnalysis(tuple(raw(t) for t in not_rebuilt), tuple(raw(t) for t in late), closed)
    if len(analysis.routed) > MAX_ROUTED_STRINGS:
        return analysis, [
            f"{len(not_rebuilt)} vocabulary entries are not rebuilt by their merges and "
            f"{len(late)} merges are listed after a merge making a higher id: more than "
            f"{MAX_ROUTED_STRINGS} exceptions to route to HF"]
    return analysis, []
