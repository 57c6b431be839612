"""The dataset-builder recipe: one set of frozen dataclasses, loaded from YAML, validated per field.

Every field has a docstring; every section checks itself in `__post_init__` and raises ValueError
naming the field and the bad value. `load_recipe(path, overrides)` is the only constructor the CLI
uses; overrides are `section.field=value` strings whose values are parsed as YAML scalars.

The UltraLong paper says only that documents shorter than 4K tokens are downsampled and documents
longer than 8K are upsampled, to 1B tokens, per domain, separated by "<s>"
(arXiv 2504.06214, continued pretraining); the factors and the domains are not published, so they are
fields here rather than constants.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, Sequence, Tuple, get_args

from megatron_ultralong import config_io

InputFormat = Literal["auto", "jsonl", "parquet"]
TokenizerKind = Literal["hf", "sentencepiece"]
FastPath = Literal["auto", "off", "require"]
SpecialInText = Literal["ordinary", "special"]
SeparatorPosition = Literal["prefix", "suffix"]
INPUT_FORMATS = get_args(InputFormat)
TOKENIZER_KINDS = get_args(TokenizerKind)
FAST_PATH_MODES = get_args(FastPath)
SPECIAL_IN_TEXT = get_args(SpecialInText)
SEPARATOR_POSITIONS = get_args(SeparatorPosition)
# The file a tokenizer directory (what HF and preprocess_data.py take) holds, per kind.
TOKENIZER_FILE_IN_DIR = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}


def _fail(name: str, value: Any, why: str) -> None:
    raise ValueError(f"{name}={value!r}: {why}")


@dataclass(frozen=True)
class InputSpec:
    """One input file or glob, optionally with a fixed domain for all its records."""

    SCALAR_FIELD: ClassVar[str] = "path"  # `inputs: [a.jsonl]` is short for `[{path: a.jsonl}]`

    path: str
    """File path or glob (JSONL plain/.gz/.zst, or .parquet); globs expand in sorted order."""

    domain: Optional[str] = None
    """Domain for every record of these files; None reads the record's `domain_field`."""

    format: InputFormat = "auto"
    """"auto" (from the suffix), "jsonl" or "parquet"."""

    def __post_init__(self) -> None:
        if not self.path:
            _fail("inputs[].path", self.path, "must be a non-empty path or glob")
        if self.format not in INPUT_FORMATS:
            _fail("inputs[].format", self.format, f"must be one of {INPUT_FORMATS}")


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer, and whether the tiktoken fast path may replace it."""

    path: str
    """An HF `tokenizer.json` (kind "hf") or a SentencePiece `.model` (kind "sentencepiece"), or
    a directory holding `tokenizer.json` / `tokenizer.model` (as HF and preprocess_data.py take)."""

    kind: TokenizerKind = "hf"
    """"hf" (Hugging Face `tokenizers`) or "sentencepiece"."""

    fast_path: FastPath = "auto"
    """"auto": tiktoken when proven equivalent, else HF; "off": HF always; "require": fail if
    the proof fails (for runs that must meet a throughput budget)."""

    special_tokens_in_text: SpecialInText = "ordinary"
    """"ordinary": a special-token string inside a document is plain text (documents cannot inject
    control tokens); "special": it becomes the special id, as `tokenizer(text)` in
    preprocess_data.py does."""

    verify_docs: int = 64
    """The corpus's first N documents, also encoded by HF and compared before the fast path is
    trusted (on top of the file-level proof). The workers keep spot-checking ~1 document in 1024
    across the whole corpus and write HF's ids for any that differ, so a larger N mainly delays
    the start: 512 cost ~1 s per 3.5 MB of sample text through HF."""

    proof_cache_dir: Optional[str] = "~/.cache/megatron_ultralong"
    """Where the fast-path proof's code-point sweep result is kept (keyed by the tokenizer file's
    sha256 and the library versions); null re-runs the sweep every time."""

    def __post_init__(self) -> None:
        if not self.path:
            _fail("tokenizer.path", self.path, "is required")
        if self.kind not in TOKENIZER_KINDS:
            _fail("tokenizer.kind", self.kind, f"must be one of {TOKENIZER_KINDS}")
        if self.fast_path not in FAST_PATH_MODES:
            _fail("tokenizer.fast_path", self.fast_path, f"must be one of {FAST_PATH_MODES}")
        if self.special_tokens_in_text not in SPECIAL_IN_TEXT:
            _fail("tokenizer.special_tokens_in_text", self.special_tokens_in_text,
                  f"must be one of {SPECIAL_IN_TEXT}")
        if self.verify_docs < 0:
            _fail("tokenizer.verify_docs", self.verify_docs, "must be >= 0")
        if os.path.isdir(os.path.expanduser(self.path)):
            inside = os.path.join(os.path.expanduser(self.path), TOKENIZER_FILE_IN_DIR[self.kind])
            if not os.path.isfile(inside):
                _fail("tokenizer.path", self.path, f"is a directory without "
                      f"{TOKENIZER_FILE_IN_DIR[self.kind]} (tokenizer.kind={self.kind!r})")
            object.__setattr__(self, "path", inside)


@dataclass(frozen=True)
class SeparatorConfig:
    """What goes between documents. The paper joins documents with the literal text "<s>"."""

    text: Optional[str] = "<s>"
    """Literal separator, tokenized as ordinary text (for Llama-3 "<s>" is 3 BPE pieces, not a
    special token). None or "" for no literal separator."""

    tokens: Tuple[str, ...] = ()
    """Special tokens used as the separator instead, e.g. ["<|end_of_text|>"]; resolved to ids."""

    position: SeparatorPosition = "prefix"
    """"prefix" puts the separator before every document (as Fu et al.'s per-document "<s>" BOS
    in Llama-2), "suffix" after every document."""

    add_bos: bool = False
    """Prepend `bos_token` to every document (inside the separator)."""

    add_eos: bool = False
    """Append `eos_token` to every document (inside the separator)."""

    bos_token: str = "<|begin_of_text|>"
    """BOS token string; "<s>" for a Llama-2 SentencePiece model."""

    eos_token: str = "<|end_of_text|>"
    """EOS token string; "</s>" for a Llama-2 SentencePiece model."""

    def __post_init__(self) -> None:
        if self.text and self.tokens:
            _fail("separator.tokens", self.tokens, "give separator.text or separator.tokens, not both")
        if self.position not in SEPARATOR_POSITIONS:
            _fail("separator.position", self.position, f"must be one of {SEPARATOR_POSITIONS}")
        if any(not t for t in self.tokens):
            _fail("separator.tokens", self.tokens, "must not contain empty strings")


@dataclass(frozen=True)
class DomainPolicy:
    """Per-domain overrides; unset fields take the `upsampling` defaults."""

    share: Optional[float] = None
    """Fraction of the token budget for this domain; if any domain sets it, all must, summing
    to 1. Unset everywhere: each domain keeps its original token share (Fu et al. per-source)."""

    short_keep_prob: Optional[float] = None
    """Relative weight of documents shorter than `short_threshold` (overrides the default)."""

    long_factor: Optional[float] = None
    """Relative weight of documents of `long_threshold` tokens or more (overrides the default)."""

    def __post_init__(self) -> None:
        if self.share is not None and not 0.0 <= self.share <= 1.0:
            _fail("upsampling.domains.*.share", self.share, "must be in [0, 1]")
        if self.short_keep_prob is not None and not 0.0 <= self.short_keep_prob <= 1.0:
            _fail("upsampling.domains.*.short_keep_prob", self.short_keep_prob, "must be in [0, 1]")
        if self.long_factor is not None and not 1.0 <= self.long_factor < math.inf:
            _fail("upsampling.domains.*.long_factor", self.long_factor, "must be finite and >= 1")


@dataclass(frozen=True)
class UpsampleConfig:
    """Length-based per-domain sampling (Fu et al. 2024 per-source upsampling; UltraLong)."""

    seed: int = 1234
    """Seed of the per-document keep/repeat draws; same seed and inputs give the same bytes."""

    total_tokens: Optional[int] = None
    """Token budget of the output, separators included (UltraLong: 1_000_000_000). None: no
    budget, the weights apply as given and the output is as large as they make it."""

    short_threshold: int = 4096
    """Documents with fewer tokens than this are "short" (UltraLong and Fu et al.: 4K)."""

    long_threshold: int = 8192
    """Documents with at least this many tokens are "long" (UltraLong: 8K); between the two
    thresholds documents have weight 1."""

    short_keep_prob: float = 1.0
    """Weight of short documents relative to medium ones (a keep probability when <= 1 after
    budget scaling). Fu et al. use 0.1; UltraLong's value is unpublished."""

    long_factor: float = 1.0
    """Weight of long documents relative to medium ones (expected copies before budget scaling)."""

    domains: Dict[str, DomainPolicy] = field(default_factory=dict)
    """Declared domains with optional overrides. Non-empty: a record of any other domain is bad
    input ("unknown domain"). Empty: every domain seen is accepted with the defaults."""

    max_doc_tokens: Optional[int] = None
    """Split documents longer than this into pieces of at most this many tokens (each piece gets
    its own separator). None (default): documents are never split."""

    def __post_init__(self) -> None:
        if self.total_tokens is not None and self.total_tokens <= 0:
            _fail("upsampling.total_tokens", self.total_tokens, "must be > 0 or null")
        if self.short_threshold < 1:
            _fail("upsampling.short_threshold", self.short_threshold, "must be >= 1")
        if self.long_threshold < self.short_threshold:
            _fail("upsampling.long_threshold", self.long_threshold, "must be >= short_threshold")
        if not 0.0 <= self.short_keep_prob <= 1.0:
            _fail("upsampling.short_keep_prob", self.short_keep_prob, "must be in [0, 1]")
        if not 1.0 <= self.long_factor < math.inf:  # inf (or NaN) would make every weight NaN
            _fail("upsampling.long_factor", self.long_factor, "must be finite and >= 1")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            _fail("upsampling.max_doc_tokens", self.max_doc_tokens, "must be >= 1 or null")
        shares = {d: p.share for d, p in self.domains.items()}
        given = [s for s in shares.values() if s is not None]
        if given and len(given) != len(shares):
            missing = sorted(d for d, s in shares.items() if s is None)
            _fail("upsampling.domains.*.share", missing, "set a share for every domain or none")
        if given and not math.isclose(sum(given), 1.0, abs_tol=1e-6):
            _fail("upsampling.domains.*.share", shares, "shares must sum to 1")

    def policy(self, domain: str) -> Tuple[float, float]:
        """(short weight, long weight) for a domain, overrides applied."""
        p = self.domains.get(domain, DomainPolicy())
        short = self.short_keep_prob if p.short_keep_prob is None else p.short_keep_prob
        long = self.long_factor if p.long_factor is None else p.long_factor
        return short, long


@dataclass(frozen=True)
class OutputConfig:
    """Where the dataset and its report go."""

    prefix: str
    """Output path prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json, PREFIX.stats.md,
    PREFIX.lengths.png (each under a temporary name until the build completes)."""

    length_buckets: Tuple[int, ...] = (1024, 4096, 8192, 32768, 131072, 1048576)
    """Upper edges (exclusive, in tokens) of the report's length buckets; a last open bucket
    catches everything longer."""

    overwrite: bool = False
    """Replace an existing dataset at `prefix`; otherwise refuse to touch it."""

    def __post_init__(self) -> None:
        if not self.prefix:
            _fail("output.prefix", self.prefix, "is required")
        edges = list(self.length_buckets)
        if not edges or edges != sorted(set(edges)) or edges[0] < 1:
            _fail("output.length_buckets", self.length_buckets, "must be increasing and >= 1")


@dataclass(frozen=True)
class BuildRecipe:
    """Everything one dataset build needs."""

    inputs: Tuple[InputSpec, ...]
    """Input files, read in this order (order fixes the output order)."""

    tokenizer: TokenizerConfig
    """Tokenizer and fast-path settings."""

    output: OutputConfig
    """Output prefix and report settings."""

    text_field: str = "text"
    """Record field holding the document text (a dotted name reads a nested field)."""

    domain_field: Optional[str] = "domain"
    """Record field holding the domain, e.g. "meta.redpajama_set_name" (dotted: nested); None
    means every input must set `domain`."""

    separator: SeparatorConfig = SeparatorConfig()
    """Separator and BOS/EOS policy."""

    upsampling: UpsampleConfig = UpsampleConfig()
    """Per-domain length-based sampling policy."""

    workers: int = 2
    """Tokenizer worker processes; 0 tokenizes in the main process."""

    skip_bad: bool = False
    """Skip bad records and count them in the report instead of failing on the first one."""

    batch_bytes: int = 1 << 20
    """Raw input bytes per work item sent to a worker; bounds memory per in-flight item."""

    def __post_init__(self) -> None:
        if not self.inputs:
            _fail("inputs", self.inputs, "at least one input is required")
        if not self.text_field:
            _fail("text_field", self.text_field, "must be a non-empty field name")
        if self.domain_field is None and any(i.domain is None for i in self.inputs):
            _fail("domain_field", None, "is null, so every input needs a fixed `domain`")
        if self.workers < 0:
            _fail("workers", self.workers, "must be >= 0")
        if self.batch_bytes < 1024:
            _fail("batch_bytes", self.batch_bytes, "must be >= 1024")


def load_recipe(path: str, overrides: Sequence[str] = ()) -> BuildRecipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate everything."""
    return recipe_from_dict(config_io.apply_overrides(config_io.load_yaml(path), overrides))


def recipe_from_dict(raw: Mapping[str, Any]) -> BuildRecipe:
    """Validate a raw mapping (as YAML gives) into a `BuildRecipe` (unknown keys, wrong types and
    choices outside a `Literal` are errors naming the key)."""
    return config_io.from_dict(BuildRecipe, raw)


def recipe_to_dict(recipe: BuildRecipe) -> Dict[str, Any]:
    """Plain-data form of a recipe (for the stats report)."""
    return config_io.to_dict(recipe)
