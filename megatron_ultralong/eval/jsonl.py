"""JSON Lines in and out for the benchmark runners and `mu-eval-score`: line-numbered errors on
read, atomic writes (a killed run never leaves a half file that looks finished)."""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from megatron_ultralong.eval.report import _atomic_write


def read_jsonl(path: str, lines: Iterable[str]) -> Iterator[tuple[str, dict]]:
    """(location "file:line", object) for each non-blank line of `lines` (read from `path`);
    ValueError naming the line if it is not JSON."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None


def read_jsonl_file(path: str) -> list[tuple[str, dict]]:
    """Every (location, object) of the JSONL file at `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(read_jsonl(path, f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
    """Write one JSON object per line (non-ASCII kept as is, as the benchmarks write), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return _atomic_write(path, write)
