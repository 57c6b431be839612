"""Tokenizer backends: HF `tokenizers`, SentencePiece, and the tiktoken fast path, one interface.

Every backend encodes *without* adding special tokens (no BOS from a post-processor): BOS, EOS
and separators are added explicitly by the builder, so they appear exactly where the recipe says
(Llama-3's tokenizer.json TemplateProcessing silently adds BOS and ignores add_eos_token:
https://github.com/huggingface/transformers/issues/30947). A backend is rebuilt inside each worker process from a picklable
`BackendSpec`, so no tokenizer object crosses a process boundary.

Long documents are encoded in pieces cut at pre-token boundaries (`pretoken_chunks`): the ids are
the same, and memory no longer grows with the longest document (HF keeps ~100+ bytes of
`Encoding` per token). The names say "Tokenizer" because `megatron_ultralong.eval` has model
backends of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple

import numpy as np

# Documents the tiktoken backend also encodes with HF and compares (about 1 in 1024, chosen by
# content hash so the choice is deterministic): a running check that costs ~0.1% of HF's time
# per tiktoken token. A mismatch uses HF's ids for that document and is counted in the report.
SPOT_CHECK_MASK = 1023


class TokenizerBackend(Protocol):
    """What the builder needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Token ids (int64 arrays) of each text, no special tokens added."""

    def token_id(self, token: str) -> Optional[int]:
        """Id of a special or vocabulary token string, None if absent."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (for tests and the report's examples)."""


@dataclass(frozen=True)
class BackendSpec:
    """Picklable description of a backend; `load_backend` rebuilds it in any process."""

    kind: str
    """"hf", "sentencepiece" or "tiktoken"."""

    path: str
    """tokenizer.json (hf, tiktoken) or SentencePiece model file."""

    special_tokens_in_text: str = "ordinary"
    """"ordinary" or "special" (see TokenizerConfig)."""

    hf_only_chars: str = ""
    """tiktoken only: a regex character class body; documents containing any of these code points
    are encoded by HF (code points the equivalence proof did not cover or saw differ)."""

    hf_only_strings: Tuple[bytes, ...] = ()
    """tiktoken only: the exceptions `bpe_merges` found from the vocabulary and merges; the
    pre-tokens holding one are encoded by HF (`exception_routing`)."""

    tainted_ids: Optional[Tuple[int, ...]] = None
    """tiktoken only: `exception_routing.tainted_ids` of `hf_only_strings` when the main process
    already has them (None: each worker computes them)."""

    parts: Optional[Any] = None
    """tiktoken only: `tiktoken_path.tiktoken_parts` of the file, from the main process (workers
    then skip parsing the tokenizer.json; None: parsed where needed)."""

    hf_threads: bool = False
    """Let HF `tokenizers` use its thread pool (only when one process does all the work)."""

    piece_chars: int = 1 << 18
    """Documents longer than this (characters) are encoded in pre-token-aligned pieces."""


def _piece_splitter(path: str, piece_chars: int):
    """A function text -> pieces for this tokenizer.json, or None when it cannot be cut exactly."""
    from megatron_ultralong.data.preprocess.pretoken_chunks import can_cut, iter_pretoken_pieces
    from megatron_ultralong.data.preprocess.tiktoken_path import read_tokenizer_json, split_pattern

    data = read_tokenizer_json(path)
    specials = [a["content"] for a in data.get("added_tokens", [])]
    if not can_cut(split_pattern(data), specials):
        return None
    return lambda text: iter_pretoken_pieces(text, piece_chars)


def _encode_long(encode_short, split, text: str) -> np.ndarray:
    """Ids of a long text (int32: ids of any real vocabulary fit): its pieces encoded one at a
    time, each kept as int32 until the one concatenation."""
    parts = [encode_short([piece])[0].astype(np.int32) for piece in split(text)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


class HFTokenizerBackend:
    """Hugging Face `tokenizers` from a tokenizer.json: the reference for ids."""

    name = "hf"

    def __init__(self, path: str, special_tokens_in_text: str = "ordinary", threads: bool = False,
                 piece_chars: int = 1 << 18, split=False):
        """split: text -> pieces (None: never cut), when the caller knows it (the tiktoken backend
        does from its parts); False: worked out here from the file (parses the tokenizer.json)."""
        import os

        if not threads:
            # The builder parallelises over processes; rayon threads on top oversubscribe cores.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from megatron_ultralong.data.preprocess.tiktoken_path import hf_tokenizer

        self.tokenizer = hf_tokenizer(path, special_tokens_in_text)  # shared per process and mode
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.piece_chars = piece_chars
        self.split = _piece_splitter(path, piece_chars) if split is False else split

    def _encode_short(self, texts: Sequence[str]) -> List[np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        if self.split is None or all(len(t) <= self.piece_chars for t in texts):
            return self._encode_short(texts)
        out: List[Optional[np.ndarray]] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= self.piece_chars]
        for i, ids in zip(short, self._encode_short([texts[i] for i in short])):
            out[i] = ids
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = _encode_long(self._encode_short, self.split, t)
        return out  # type: ignore[return-value]

    def token_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizerBackend:
    """SentencePiece model (Llama-2 style). Control symbols in text are never parsed as specials."""

    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.sp.encode(list(texts))]

    def token_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)
        # piece_to_id returns unk for unknown pieces; only unk itself may map to unk.
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizerBackend:
    """tiktoken encoding rebuilt from a byte-level BPE tokenizer.json that `prove_equivalence`
    accepted, with the spans around merge exceptions encoded by HF (`exception_routing`). HF stays
    loaded for those spans, for documents routed to it whole, and for spot checks."""

    name = "tiktoken"

    def __init__(self, spec: BackendSpec):
        from megatron_ultralong.data.preprocess.pretoken_chunks import can_cut, iter_pretoken_pieces
        from megatron_ultralong.data.preprocess.tiktoken_path import UNSWEPT_CLASS, Router, build_stitched, tiktoken_parts

        self.spec = spec
        self._hf: Optional[HFTokenizerBackend] = None
        # The main process analysed this file's merges (their exceptions are in the spec) and
        # proved it before choosing this backend.
        parts = spec.parts if spec.parts is not None else tiktoken_parts(spec.path)
        self.parts = parts
        # With no mismatched code point, the only ones HF must see are the unswept planes: found
        # from the output ids (a lead byte F1-F4 in a token) instead of a regex over the text.
        high = spec.hf_only_chars == UNSWEPT_CLASS
        self.stitched = build_stitched(parts, lambda: self.hf.tokenizer, spec.hf_only_strings,
                                       spec.special_tokens_in_text, spec.tainted_ids,
                                       UNSWEPT_CLASS if high else None)
        self.encoding = self.stitched.encoding
        self.router = Router("" if high else spec.hf_only_chars)
        self.piece_chars = spec.piece_chars
        self.split = None
        if can_cut(parts.pat_str, list(parts.special_tokens) + list(parts.added_names)):
            self.split = lambda text: iter_pretoken_pieces(text, spec.piece_chars)
        self.routed_docs = 0
        self.spot_checked = 0
        self.spot_mismatches = 0

    @property
    def hf(self) -> HFTokenizerBackend:
        """HF, loaded when first needed (~0.5 s of CPU per process for a 128K vocabulary): a
        tokenizer without exceptions needs it only for the rare spot check."""
        if self._hf is None:
            s = self.spec
            self._hf = HFTokenizerBackend(s.path, s.special_tokens_in_text, s.hf_threads, s.piece_chars,
                                          self.split)
        return self._hf

    @property
    def vocab_size(self) -> int:
        return self.parts.vocab_size or self.hf.vocab_size

    @property
    def counters(self) -> dict:
        """Running totals: whole documents sent to HF, exception spans encoded by HF (count and
        bytes, cache hits), spot checks, and the seconds spent routing spans."""
        return {"routed_to_hf": self.routed_docs, "spot_checked": self.spot_checked,
                "spot_mismatches": self.spot_mismatches, **self.stitched.counters,
                "routing_s": self.stitched.routing_s}

    def _encode_long(self, text: str) -> Optional[np.ndarray]:
        parts = []
        for piece in self.split(text):  # one piece's copy of the text alive at a time
            ids = self.stitched.encode_many([piece])[0]
            if ids is None:
                return None
            parts.append(ids)
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    def _fast(self, texts: Sequence[str]) -> List[Optional[np.ndarray]]:
        """Fast-path ids of each text, None where HF must encode the whole text."""
        out: List[Optional[np.ndarray]] = [None] * len(texts)
        short = []
        for i, text in enumerate(texts):
            if self.router.needs_hf(text):
                continue
            if len(text) > self.piece_chars and self.split is not None:
                try:
                    out[i] = self._encode_long(text)
                except Exception:  # e.g. tiktoken's regex stack overflow on pathological input
                    out[i] = None
            else:
                short.append(i)
        if short:
            try:
                got = self.stitched.encode_many([texts[i] for i in short])
            except Exception:  # one text failed: encode them one by one, HF for that one
                got = []
                for i in short:
                    try:
                        got += self.stitched.encode_many([texts[i]])
                    except Exception:
                        got.append(None)
            for i, ids in zip(short, got):
                out[i] = ids
        return out

    def encode_batch(self, texts: Sequence[str], keys: Optional[np.ndarray] = None) -> List[np.ndarray]:
        out = self._fast(texts)
        need_hf = [i for i, ids in enumerate(out) if ids is None]
        check = []
        if keys is not None:
            check = [i for i in range(len(texts)) if out[i] is not None
                     and int(keys[i]) & SPOT_CHECK_MASK == 0]
        if need_hf or check:
            ref = self.hf.encode_batch([texts[i] for i in need_hf + check])
            for i, ids in zip(need_hf, ref):
                out[i] = ids
            for i, ids in zip(check, ref[len(need_hf):]):
                if not np.array_equal(out[i], ids):
                    self.spot_mismatches += 1
                    out[i] = ids
            self.routed_docs += len(need_hf)
            self.spot_checked += len(check)
        return out  # type: ignore[return-value]

    def token_id(self, token: str) -> Optional[int]:
        return self.parts.token_id(token)  # HF's token_to_id, without loading HF

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(ids)


def load_backend(spec: BackendSpec) -> TokenizerBackend:
    """Build the backend a spec describes (in the calling process)."""
    if spec.kind == "hf":
        return HFTokenizerBackend(spec.path, spec.special_tokens_in_text, spec.hf_threads,
                                  spec.piece_chars)
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizerBackend(spec.path)
    if spec.kind == "tiktoken":
        return TiktokenTokenizerBackend(spec)
    raise ValueError(f"backend kind={spec.kind!r}: expected hf, sentencepiece or tiktoken")


def special_token_ids(backend: TokenizerBackend, tokens: Sequence[str], field: str) -> List[int]:
    """Ids of special-token strings; a missing one is a ValueError naming the recipe field."""
    ids = []
    for tok in tokens:
        i = backend.token_id(tok)
        if i is None:
            raise ValueError(f"{field}={tok!r}: not a token of this tokenizer")
        ids.append(i)
    return ids

