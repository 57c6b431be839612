"""Streaming readers: input files -> bounded batches of raw records -> validated documents.

The main process only reads bytes (and decompresses); JSON parsing and validation run in the
workers (`parse_batch`), so one slow stage does not serialise the rest. A batch carries its file
and first line number, so every bad record can be named as `file:line` (Parquet: `file:row N`).
Nothing is held beyond one batch per in-flight work item: memory does not grow with the corpus.

A compressed stream (.gz, .zst) or Parquet file that ends early or is corrupt is a fatal
`CorruptInputError` naming the file and the byte (row) where reading stopped, never a bad record:
`--skip-bad` must not turn half a corpus into "1 malformed record". zstd is decompressed here
frame by frame rather than through `stream_reader`, which returns a truncated frame's bytes and
then a silent EOF.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator, List, Optional, Sequence, Tuple

from megatron_ultralong.data.preprocess.recipe import BuildRecipe, InputSpec

logger = logging.getLogger(__name__)

MAX_LINES_PER_BATCH = 4096
UTF8_BOM = b"\xef\xbb\xbf"
READ_BYTES = 1 << 20


class CorruptInputError(ValueError):
    """A compressed stream or Parquet file that cannot be read to its end: always fatal."""


@dataclass(frozen=True)
class RawBatch:
    """Up to `batch_bytes` of one file's records, not yet parsed."""

    source: str
    """The input file, as expanded from the recipe (used in error messages)."""

    first_line: int
    """1-based line (JSONL) or row (Parquet) number of the first record."""

    lines: Tuple[bytes, ...] = ()
    """JSONL: raw lines (blank lines included, so numbering stays exact)."""

    rows: Tuple[Tuple[object, object], ...] = ()
    """Parquet: (text, domain) cells."""

    fixed_domain: Optional[str] = None
    """The input's fixed domain, or None to read the record's domain field."""

    file_bytes: int = 0
    """Bytes of the file on disk (compressed, for .gz/.zst) read for this batch: progress."""


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot become a document."""

    source: str
    line: int
    reason: str
    detail: str = ""

    def where(self) -> str:
        unit = "row " if self.source.endswith(".parquet") else ""
        return f"{self.source}:{unit}{self.line}"

    def message(self) -> str:
        return f"{self.where()}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ParsedBatch:
    """Valid documents of a batch, plus what was rejected."""

    texts: List[str] = field(default_factory=list)
    domains: List[str] = field(default_factory=list)
    keys: List[int] = field(default_factory=list)
    bad: List[BadRecord] = field(default_factory=list)
    blank_lines: int = 0


class BadInputError(ValueError):
    """Raised on the first bad record when --skip-bad is not given."""

    def __init__(self, record: BadRecord):
        super().__init__(record.message() + " (rerun with --skip-bad to skip and count these)")
        self.record = record


def expand_inputs(inputs: Sequence[InputSpec]) -> List[Tuple[str, InputSpec]]:
    """(file, spec) pairs: globs expanded in sorted order; a pattern matching nothing, or a
    directory, is an error. A file reached twice (listed twice, through a symlink, by overlapping
    globs) or two files with identical contents are read once, with a warning naming both: reading
    them twice would silently double their documents. The same file under two different fixed
    domains is an error (which one is meant cannot be guessed)."""
    files: List[Tuple[str, InputSpec]] = []
    for spec in inputs:
        if glob.has_magic(spec.path):
            matches = sorted(glob.glob(spec.path))
            if matches and not any(os.path.isfile(m) for m in matches):
                raise IsADirectoryError(f"inputs[].path={spec.path!r}: matches only directories "
                                        f"(e.g. {matches[0]}), no files")
            matches = [m for m in matches if os.path.isfile(m)]
        elif os.path.isdir(spec.path):
            raise IsADirectoryError(f"inputs[].path={spec.path!r}: is a directory (give its "
                                    f"files, or a glob such as {os.path.join(spec.path, '*.jsonl')!r})")
        else:
            matches = [spec.path] if os.path.isfile(spec.path) else []
        if not matches:
            raise FileNotFoundError(f"inputs[].path={spec.path!r}: no such file")
        files += [(m, spec) for m in matches]
    return _drop_duplicates(files)


def _drop_duplicates(files: List[Tuple[str, InputSpec]]) -> List[Tuple[str, InputSpec]]:
    """`files` without second occurrences of one file (by real path) or of identical contents
    (same size, then same sha256: only files of equal size are hashed)."""
    by_real: dict = {}
    kept: List[Tuple[str, InputSpec]] = []
    for path, spec in files:
        real = os.path.realpath(path)
        if real in by_real:
            first, first_spec = by_real[real]
            _same_file(first, first_spec, path, spec, "is the same file as")
            continue
        by_real[real] = (path, spec)
        kept.append((path, spec))
    by_size: dict = {}
    for path, spec in kept:
        by_size.setdefault(os.path.getsize(path), []).append((path, spec))
    drop = set()
    for group in by_size.values():
        if len(group) < 2:
            continue
        seen: dict = {}
        for path, spec in group:
            digest = _sha256(path)
            if digest in seen:
                first, first_spec = seen[digest]
                _same_file(first, first_spec, path, spec, "has the same contents as")
                drop.add(path)
            else:
                seen[digest] = (path, spec)
    return [(p, s) for p, s in kept if p not in drop]


def _same_file(first: str, first_spec: InputSpec, path: str, spec: InputSpec, how: str) -> None:
    if first_spec.domain != spec.domain:
        raise ValueError(f"inputs[].path={spec.path!r}: {path} {how} {first} but the two inputs "
                         f"give different domains ({spec.domain!r} vs {first_spec.domain!r})")
    logger.warning("inputs: %s %s %s; reading it once (listing it twice would double its "
                   "documents)", path, how, first)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def input_format(path: str, spec: InputSpec) -> str:
    if spec.format != "auto":
        return spec.format
    return "parquet" if path.endswith(".parquet") else "jsonl"


def _zstd_blocks(raw: IO[bytes], path: str) -> Iterator[bytes]:
    """Decompressed blocks of a (multi-frame) zstd file; a frame cut short is fatal."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed = dctx.decompressobj(), False
    while True:
        chunk = raw.read(READ_BYTES)
        if not chunk:
            break
        while chunk:
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise CorruptInputError(f"{path}: corrupt zstd stream near compressed byte "
                                        f"{raw.tell()}: {e}") from None
            fed = True
            if out:
                yield out
            if dobj.eof:  # frame complete: the rest of the chunk starts the next frame
                chunk, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
    if fed:
        raise CorruptInputError(f"{path}: zstd stream ends inside a frame at compressed byte "
                                f"{raw.tell()} (truncated file?)")


def _gzip_blocks(raw: IO[bytes], path: str) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        while True:
            try:
                block = f.read(READ_BYTES)
            except (EOFError, OSError, zlib.error) as e:
                raise CorruptInputError(f"{path}: gzip stream ends early or is corrupt at "
                                        f"compressed byte {raw.tell()}: {e}") from None
            if not block:
                return
            yield block


def iter_lines(path: str, position: Optional[List[int]] = None) -> Iterator[bytes]:
    """Lines (with their newline) of a plain, .gz or .zst JSONL file, decompressed in bounded
    blocks; a truncated or corrupt compressed stream raises `CorruptInputError`.
    `position[0]`, if given, follows the bytes of the file read so far."""
    position = position if position is not None else [0]
    with open(path, "rb") as raw:
        if path.endswith(".gz"):
            blocks = _gzip_blocks(raw, path)
        elif path.endswith((".zst", ".zstd")):
            blocks = _zstd_blocks(raw, path)
        else:
            blocks = iter(lambda: raw.read(READ_BYTES), b"")
        tail = b""
        for block in blocks:
            position[0] = raw.tell()
            parts = (tail + block).split(b"\n")
            tail = parts.pop()
            for part in parts:
                yield part + b"\n"
        if tail:
            yield tail


def _jsonl_batches(path: str, spec: InputSpec, batch_bytes: int) -> Iterator[RawBatch]:
    lines: List[bytes] = []
    size, first, position, reported = 0, 1, [0], 0
    for number, line in enumerate(iter_lines(path, position), start=1):
        lines.append(line)
        size += len(line)
        if size >= batch_bytes or len(lines) >= MAX_LINES_PER_BATCH:
            yield RawBatch(path, first, lines=tuple(lines), fixed_domain=spec.domain,
                           file_bytes=position[0] - reported)
            lines, size, first, reported = [], 0, number + 1, position[0]
    if lines:
        yield RawBatch(path, first, lines=tuple(lines), fixed_domain=spec.domain,
                       file_bytes=os.path.getsize(path) - reported)


def _parquet_batches(path: str, spec: InputSpec, recipe: BuildRecipe) -> Iterator[RawBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorruptInputError(f"{path}: not a readable Parquet file: {e}") from None
    names = set(pf.schema_arrow.names)
    wanted = [c for c in (recipe.text_field, recipe.domain_field) if c and c in names]
    row = 1
    # Rows are read in slices sized from the file's average uncompressed row size (row-group
    # metadata), so a work item holds about `batch_bytes` of text whatever the row-group size.
    meta = pf.metadata
    data_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    avg = data_bytes // max(1, meta.num_rows)
    rows_per_batch = max(1, min(MAX_LINES_PER_BATCH, recipe.batch_bytes // max(avg, 256)))
    batches = pf.iter_batches(batch_size=rows_per_batch, columns=wanted or None)
    while True:
        try:
            table = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise CorruptInputError(f"{path}: Parquet data unreadable from row {row} of "
                                    f"{meta.num_rows}: {e}") from None
        if table is None:
            break
        n = table.num_rows
        text = table.column(recipe.text_field).to_pylist() if recipe.text_field in wanted else [_MISSING] * n
        dom_col = recipe.domain_field if recipe.domain_field in wanted else None
        domain = table.column(dom_col).to_pylist() if dom_col else [_MISSING] * n
        yield RawBatch(path, row, rows=tuple(zip(text, domain)), fixed_domain=spec.domain,
                       file_bytes=os.path.getsize(path) * n // max(1, meta.num_rows))
        row += n


_MISSING = object()


def iter_raw_batches(recipe: BuildRecipe) -> Iterator[RawBatch]:
    """Every input's records, in recipe order, as bounded raw batches."""
    for path, spec in expand_inputs(recipe.inputs):
        if input_format(path, spec) == "parquet":
            yield from _parquet_batches(path, spec, recipe)
        else:
            yield from _jsonl_batches(path, spec, recipe.batch_bytes)


def document_key(text_utf8: bytes) -> int:
    """64-bit content hash: the per-document sampling draw depends on the text, not its position."""
    return int.from_bytes(hashlib.blake2b(text_utf8, digest_size=8).digest(), "little")


def _validate(
    out: ParsedBatch, source: str, line: int, text: object, domain: object,
    known_domains: Optional[frozenset], fields: Tuple[str, Optional[str]],
) -> None:
    if text is _MISSING or text is None:
        out.bad.append(BadRecord(source, line, "missing field", repr(fields[0])))
        return
    if domain is _MISSING or domain is None:
        out.bad.append(BadRecord(source, line, "missing field", repr(fields[1])))
        return
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad.append(BadRecord(source, line, "non-UTF-8", str(e)))
            return
    if not isinstance(text, str):
        out.bad.append(BadRecord(source, line, "missing field",
                                 f"{fields[0]!r} is {type(text).__name__}, not a string"))
        return
    try:
        # Also rejects lone surrogates, which JSON "\ud800" escapes can smuggle into a str.
        raw = text.encode("utf-8")
    except UnicodeEncodeError as e:
        out.bad.append(BadRecord(source, line, "non-UTF-8", str(e)))
        return
    if not text or text.isspace():  # not text.strip(): that copies a 50 MB document
        out.bad.append(BadRecord(source, line, "empty text"))
        return
    if not isinstance(domain, str):  # 5, NaN, {"a": 1}: not a domain name, whatever str() makes
        out.bad.append(BadRecord(source, line, "bad domain",
                                 f"{fields[1]!r} is {type(domain).__name__} {domain!r:.40}, not a string"))
        return
    if known_domains is not None and domain not in known_domains:
        out.bad.append(BadRecord(source, line, "unknown domain", domain))
        return
    out.texts.append(text)
    out.domains.append(domain)
    out.keys.append(document_key(raw))


def parse_batch(
    batch: RawBatch, text_field: str, domain_field: Optional[str],
    known_domains: Optional[frozenset],
) -> ParsedBatch:
    """Validate a raw batch into documents; bad records are returned, never dropped."""
    out = ParsedBatch()
    fields = (text_field, domain_field)
    for i, cells in enumerate(batch.rows):
        text, domain = cells
        _validate(out, batch.source, batch.first_line + i, text,
                  batch.fixed_domain if batch.fixed_domain is not None else domain, known_domains,
                  fields)
    for i, line in enumerate(batch.lines):
        number = batch.first_line + i
        if line.startswith(UTF8_BOM):  # valid UTF-8 (a BOM some writers put on a file or line)
            line = line[len(UTF8_BOM):]
        if not line or line.isspace():  # no copy, unlike strip()
            # Not a record and never fatal, but reported with file:line like a skipped record.
            out.blank_lines += 1
            out.bad.append(BadRecord(batch.source, number, "blank line"))
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.bad.append(BadRecord(batch.source, number, "non-UTF-8", str(e)))
            continue
        try:
            record = json.loads(decoded)
        except ValueError as e:
            out.bad.append(BadRecord(batch.source, number, "malformed JSON", str(e)))
            continue
        finally:
            # The decoded line is as large as its text (4 bytes a character once one is outside
            # the BMP): do not keep it alive next to the text through validation and encoding.
            del decoded
        if not isinstance(record, dict):
            out.bad.append(BadRecord(batch.source, number, "malformed JSON", "not an object"))
            continue
        domain = batch.fixed_domain
        if domain is None:
            domain = get_field(record, domain_field) if domain_field else _MISSING
        _validate(out, batch.source, number, get_field(record, text_field), domain,
                  known_domains, fields)
    return out


def get_field(record: dict, name: str) -> object:
    """record[name], or a nested lookup for dotted names ("meta.redpajama_set_name")."""
    if name in record:
        return record[name]
    node: object = record
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node
