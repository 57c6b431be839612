"""`PREFIX.dataset.json`: the facts a tokenized dataset carries from the builder to the trainer.

`mu-build-dataset` writes it beside `PREFIX.bin/.idx` (data/preprocess/builder.py); the trainer reads
it (data/samples/pretrain.py, training/startup_checks.py), so nothing about the data is copied into
the training config by hand:

    {"format": "megatron-ultralong-dataset", "version": 1,
     "separator": {"text": "<s>", "ids": [27, 82, 29], "position": "prefix"},
     "bos_ids": [], "eos_ids": [],
     "tokenizer": {"path": ".../tokenizer.json", "vocab_size": 128256,
                   "vocab_sha256": "...", "file_sha256": "..."}}

Document boundaries follow the separator's whole id sequence (the UltraLong recipe's separator, the
text "<s>", is several BPE pieces in Llama-3's vocabulary, so no single id could mark it). A prefix
separator opens the document it precedes; a suffix one (or an EOS) closes the one it follows.

Tokenizer identity is the SHA-256 of its canonical token -> id map (the thing that gives the ids in
the .bin their meaning: a re-saved or reformatted tokenizer.json keeps it, another vocabulary never
does), plus the file's own hash and the vocabulary size. Datasets without this file (older builds,
megatron's own preprocess_data.py) keep working with `data.eod_token_id` set by hand.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Literal, Optional

SUFFIX = ".dataset.json"
FORMAT = "megatron-ultralong-dataset"
VERSION = 1


@dataclass(frozen=True)
class DocumentBoundary:
    """A token-id sequence that marks where documents meet in packed data."""

    ids: tuple[int, ...]
    """The marker's ids, in order (one id for an EOD token, several for a literal text separator)."""

    opens: bool
    """True: the marker starts the document it precedes (a prefix separator, a BOS); False: it ends
    the one it follows (a suffix separator, an EOS/EOD token)."""


@dataclass(frozen=True)
class TokenizerIdentity:
    """Which tokenizer made the ids."""

    path: str
    """The tokenizer file the builder read (informative: the hashes identify it)."""
    vocab_size: int
    """Ids it can produce, added tokens included: every id in the .bin is below it."""
    vocab_sha256: Optional[str]
    """SHA-256 of the canonical token -> id map (HF tokenizer.json); None for other kinds."""
    file_sha256: str
    """SHA-256 of the tokenizer file's bytes."""


@dataclass(frozen=True)
class DatasetInfo:
    """The content of PREFIX.dataset.json."""

    separator_text: Optional[str]
    """The separator as the recipe wrote it (literal text), or None for special tokens / none."""
    separator_ids: tuple[int, ...]
    """The separator's ids as written into the .bin (empty: no separator)."""
    separator_position: Literal["prefix", "suffix"]
    """Before every document, or after it."""
    bos_ids: tuple[int, ...]
    """Ids written at each document's start besides the separator (BOS), usually empty."""
    eos_ids: tuple[int, ...]
    """Ids written at each document's end (EOS), usually empty."""
    tokenizer: TokenizerIdentity
    """The tokenizer that produced every id."""

    def boundary(self) -> Optional[DocumentBoundary]:
        """What marks a document boundary: the separator, else the EOS, else the BOS; None if nothing
        does (then a sample is one document)."""
        if self.separator_ids:
            return DocumentBoundary(self.separator_ids, self.separator_position == "prefix")
        if self.eos_ids:
            return DocumentBoundary(self.eos_ids, False)
        if self.bos_ids:
            return DocumentBoundary(self.bos_ids, True)
        return None

    def to_json(self) -> dict:
        t = self.tokenizer
        return {"format": FORMAT, "version": VERSION,
                "separator": {"text": self.separator_text, "ids": list(self.separator_ids),
                              "position": self.separator_position},
                "bos_ids": list(self.bos_ids), "eos_ids": list(self.eos_ids),
                "tokenizer": {"path": t.path, "vocab_size": t.vocab_size, "vocab_sha256": t.vocab_sha256,
                              "file_sha256": t.file_sha256}}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "DatasetInfo":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} file (field 'format')")
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: version {d.get('version')!r}, this release reads version {VERSION}")
        try:
            sep, tok = d["separator"], d["tokenizer"]
            ids = (tuple(int(i) for i in sep["ids"]), tuple(int(i) for i in d["bos_ids"]),
                   tuple(int(i) for i in d["eos_ids"]))
            identity = TokenizerIdentity(str(tok["path"]), int(tok["vocab_size"]), tok.get("vocab_sha256"),
                                         str(tok["file_sha256"]))
            position = sep["position"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: missing or malformed field ({type(e).__name__}: {e})") from None
        if position not in ("prefix", "suffix"):
            raise ValueError(f"{where}: separator.position={position!r}: expected 'prefix' or 'suffix'")
        return cls(sep.get("text"), ids[0], position, ids[1], ids[2], identity)


def info_path(prefix: str) -> str:
    return prefix + SUFFIX


def read_dataset_info(prefix: str) -> Optional[DatasetInfo]:
    """PREFIX.dataset.json, or None when the dataset has none (plain JSON: nothing read runs code)."""
    path = info_path(prefix)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return DatasetInfo.from_json(d, path)


def write_dataset_info(path: str, info: DatasetInfo) -> None:
    """Write `info` to `path` (the builder passes its atomic-output temporary)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info.to_json(), f, indent=1)
        f.write("\n")


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_file(path: str) -> str:
    """An HF tokenizer directory -> its tokenizer.json; a file -> itself."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def tokenizer_identity(path: str, loaded=None) -> TokenizerIdentity:
    """Identity of a tokenizer file or HF directory (tokenizer.json: vocabulary hash too).

    loaded: the file's `tokenizers.Tokenizer` when the caller already has it (loading one with a
    128K vocabulary takes ~0.5 s)."""
    file = tokenizer_file(path)
    if not os.path.isfile(file):
        raise ValueError(f"tokenizer {path!r}: no such file (expected a tokenizer.json or a directory with one)")
    vocab_sha, vocab_size = None, None
    if file.endswith(".json"):
        from tokenizers import Tokenizer

        try:
            tok = loaded if loaded is not None else Tokenizer.from_file(file)
        except Exception as e:  # the Rust library raises a bare Exception for a bad file
            raise ValueError(f"tokenizer {file}: cannot be read ({e})") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
        vocab_sha = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
    else:
        import sentencepiece

        vocab_size = sentencepiece.SentencePieceProcessor(model_file=file).get_piece_size()
    return TokenizerIdentity(os.path.abspath(file), int(vocab_size), vocab_sha, file_digest(file))


def same_tokenizer(a: TokenizerIdentity, b: TokenizerIdentity) -> bool:
    """Same ids for the same tokens: equal vocabulary hashes when both have one, else equal files."""
    if a.vocab_sha256 and b.vocab_sha256:
        return a.vocab_sha256 == b.vocab_sha256 and a.vocab_size == b.vocab_size
    return a.file_sha256 == b.file_sha256
