"""What the suite's dataset-file benchmarks (LV-Eval, InfiniteBench) share: samples cut into
resumable chunks, a routing estimate of each prompt's length, the data files' identity for the
grid header, and a one-line error when a file is missing.

A cell is one chunk of consecutive samples of one file, so a killed run loses at most one chunk
and the per-sample scores of all chunks of a file give the file's score exactly as the
benchmark's own evaluator computes it on the whole file.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

from megatron_ultralong.eval.ruler.inputs import file_identity

ROUTING_ASCII_CHARS_PER_TOKEN = 3.0
"""Default ASCII characters per token of the routing estimate. Llama-3's tokenizer averages about
4 on English prose; 3 errs long, so a prompt near the limit goes to the Megatron backend."""


def estimate_tokens(text: str, ascii_chars_per_token: float) -> int:
    """An upper-leaning estimate of `text`'s token count, for routing only (the backends count the
    real tokens): ASCII characters / ascii_chars_per_token, plus one token per other character
    (Chinese characters are about one token each or less in Llama-3's 128K vocabulary). Counting
    exactly would mean tokenizing every prompt before any model loads: minutes for InfiniteBench."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return int(math.ceil(ascii_chars / ascii_chars_per_token)) + (len(text) - ascii_chars)


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of `size` samples covering range(n)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def fingerprint(path: str) -> dict:
    """Size and mtime of a data file (a zip member `zip::member`: the zip's, and the member's name)."""
    if "::" in path:
        zpath, member = path.split("::", 1)
        return dict(file_identity(zpath) or {}, member=member)
    return file_identity(path) or {}


def parse_key(key: str) -> dict[str, str]:
    """"dataset=x/level=16k/samples=0-10" -> {"dataset": "x", "level": "16k", "samples": "0-10"}."""
    return dict(part.split("=", 1) for part in key.split("/"))


def samples_range(key: str) -> tuple[int, int]:
    a, b = parse_key(key)["samples"].split("-")
    return int(a), int(b)


class FileIndex:
    """Per data file: its path, sample count and the longest estimated prompt of each chunk, read
    once; and the samples of the file last asked for (a 256K-word file is read once per file, not
    once per chunk)."""

    def __init__(self, load: Callable[[str], tuple[str, list[dict]]], prompt_of: Callable[[str, int, dict], str],
                 ascii_chars_per_token: float):
        self._load, self._prompt_of, self._cpt = load, prompt_of, ascii_chars_per_token
        self.paths: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.longest: dict[str, list[int]] = {}
        self._last: Optional[tuple[str, list[dict]]] = None

    def index(self, file_key: str, limit: Optional[int]) -> None:
        if file_key in self.counts:
            return
        path, samples = self._load(file_key)
        samples = samples[:limit]
        self.paths[file_key], self.counts[file_key] = path, len(samples)
        self.longest[file_key] = [estimate_tokens(self._prompt_of(file_key, i, s), self._cpt)
                                  for i, s in enumerate(samples)]
        self._last = (file_key, samples)

    def samples(self, file_key: str, limit: Optional[int]) -> list[dict]:
        if self._last is None or self._last[0] != file_key:
            self._last = (file_key, self._load(file_key)[1][:limit])
        return self._last[1]


def missing_file_error(section: str, what: str, path_hint: str, download: str) -> ValueError:
    """The one-line error for a data file that is not there, with the command that fetches it."""
    return ValueError(f"benchmarks.{section}: {what} not found ({path_hint}); download it with: {download} "
                      "(docs/evaluation.md)")


def pct(values: list[float]) -> float:
    """100 x the mean of per-sample values in [0, 1]."""
    return 100 * (sum(values) / len(values))


def out_path(out_dir: str, *parts: str) -> str:
    path = os.path.join(out_dir, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
