"""Running an evaluation grid for hours: results per cell as JSON lines, resume, progress and ETA.

A 1M-token NIAH grid is 20+ cells of minutes each, on an allocation that can be preempted. So:

* every finished cell is appended to `<out>/<name>_cells.jsonl` at once (one JSON object per line,
  flushed and fsynced), after a header line holding the run's configuration;
* a re-run with the same --out reads that file and skips the cells already there (their records
  are reused for the final JSON and plots): nothing computed twice, nothing lost. A run killed in
  the middle of writing leaves at most a partial last line, which is dropped (and cut from the
  file) with a warning; a file written with a different configuration, or by other weights,
  tokenizer or backend (the header's `identity`, identity.py), is refused, never mixed in;
* after each cell a log line gives cell i/N, elapsed time and the ETA. The ETA assumes a cell's
  time grows with its prompt tokens (`Cell.cost`); cells resumed from the file count neither way.

Every rank of a distributed backend runs the same loop; the writer reads the file and
`backend.broadcast_from_writer` tells every rank which cells to skip, so all ranks call the same
collectives.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

logger = logging.getLogger(__name__)

OverLength = Literal["warn", "refuse"]
OVER_LENGTH_POLICIES = ("warn", "refuse")


@dataclass(frozen=True)
class Cell:
    """One cell of a grid."""

    key: str
    """Unique, stable name (e.g. "length=131072/depth=0.5"); what resume matches on."""

    cost: float
    """Relative cost for the ETA (prompt tokens x samples)."""

    label: str = ""
    """Human-readable description for the progress line."""


@dataclass(frozen=True)
class BenchCell:
    """One unit of work, run and saved as a whole."""

    key: str
    """Stable unique name within the benchmark (what resume matches on)."""

    prompt_tokens: int
    """Longest prompt of the cell in tokens (prompt + generation): picks the backend."""

    num_prompts: int
    """Prompts in the cell (with prompt_tokens: the ETA's and the cost table's weight)."""

    label: str = ""
    """Human-readable name for the progress line."""

    new_tokens: int = 0
    """Tokens generated per prompt at most (the cost table's decode term)."""


def check_length(prompt_tokens: int, max_new_tokens: int, max_positions: Optional[int], policy: OverLength,
                 flag: str = "--lengths") -> bool:
    """Whether prompt + generated tokens exceed the model's max_position_embeddings.

    policy "refuse" raises ValueError naming `flag`; "warn" logs a warning and returns True
    (evaluating past the trained length is what a NIAH heatmap is often for)."""
    if policy not in OVER_LENGTH_POLICIES:
        raise ValueError(f"--over-length={policy!r}: expected one of {OVER_LENGTH_POLICIES}")
    if max_positions is None or prompt_tokens + max_new_tokens <= max_positions:
        return False
    message = (f"{flag}: a {prompt_tokens}-token prompt + {max_new_tokens} new tokens exceeds the model's "
               f"max_position_embeddings={max_positions}")
    if policy == "refuse":
        raise ValueError(message + " (--over-length refuse)")
    logger.warning("%s; positions beyond it were never trained (--over-length refuse to stop instead)", message)
    return True


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The fields (dotted) where two headers differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1] or 'header'}: {old!r} != {new!r}"]


def read_cells(path: str, header: dict) -> dict[str, Any]:
    """Finished cells of a previous run at `path` ({key: result}); {} if the file does not exist.

    ValueError naming the file (and line) for a different configuration or identity (weights,
    tokenizer, backend: their cells are never reused), cells without a header line (nothing says
    what produced them), or a corrupt line; a partial last line (the run died while writing it) is
    cut from the file with a warning: if that was the header, the file is left empty and the
    runner writes the header again."""
    if not os.path.exists(path):
        return {}
    header = json.loads(json.dumps(header))  # tuples -> lists, as the file holds them
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    done: dict[str, Any] = {}
    good_bytes = 0
    seen_header = False
    for i, raw in enumerate(lines, 1):
        last = i == len(lines)
        if not raw.strip():
            good_bytes += len(raw) + (0 if last else 1)
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            if last:  # no newline after it: the writer died mid-line
                logger.warning("%s line %d: incomplete last line (run interrupted while writing); dropped", path, i)
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise ValueError(f"{path} line {i}: not valid JSON ({e}); fix or remove the file") from e
        if not seen_header:
            if not isinstance(obj, dict) or "header" not in obj:
                raise ValueError(f"{path} line {i}: cells without a header line, so nothing says which model, "
                                 "tokenizer and backend produced them; use another --out or delete the file")
            diff = _differences(obj["header"], header)
            if diff:
                raise ValueError(f"{path}: written by a run with a different configuration ({'; '.join(diff)}); "
                                 "its cells are not reused: use another --out or delete the file to start over")
            seen_header = True
        elif not isinstance(obj, dict) or "cell" not in obj:
            raise ValueError(f"{path} line {i}: expected a cell record with a 'cell' field")
        else:
            done[obj["cell"]] = obj["result"]
        good_bytes += len(raw) + (0 if last else 1)
    return done


def write_header(path: str, header: dict) -> None:
    """Create `path` holding only the header line, atomically (a crash leaves no partial header)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"header": header}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class GridRunner:
    """Runs cells in order, skipping finished ones, appending each new result as one JSON line."""

    def __init__(self, path: Optional[str], header: dict, backend: Any, name: str, log: bool = True):
        self.path = path
        self.header = header
        self.name = name
        self.log = log
        self.writer = bool(getattr(backend, "is_writer", True))
        done: dict[str, Any] = {}
        if path is not None and self.writer:
            done = read_cells(path, header)
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                write_header(path, header)
        share = getattr(backend, "broadcast_from_writer", None)  # absent on single-process test doubles
        self.done: dict[str, Any] = done if share is None else share(done)

    def _append(self, obj: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run(self, cells: Sequence[Cell], compute: Callable[[Cell], Any],
            describe: Callable[[Any], str] = lambda r: "") -> list[Any]:
        """compute(cell) -> a JSON-serialisable result for every cell not done; returns all results
        in cell order. describe(result) adds to the progress line (e.g. the score)."""
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.name}: duplicate grid cells {sorted(k for k in keys if keys.count(k) > 1)}")
        todo_cost = sum(c.cost for c in cells if c.key not in self.done)
        resumed = sum(c.key in self.done for c in cells)
        if resumed and self.log:
            logger.info("[%s] resuming from %s: %d of %d cells already done", self.name, self.path, resumed, len(cells))
        start, spent_cost = time.perf_counter(), 0.0
        results = []
        for i, cell in enumerate(cells, 1):
            if cell.key in self.done:
                results.append(self.done[cell.key])
                continue
            result = compute(cell)
            if self.path is not None and self.writer:
                self._append({"cell": cell.key, "result": result})
            results.append(result)
            spent_cost += cell.cost
            elapsed = time.perf_counter() - start
            eta = elapsed / spent_cost * (todo_cost - spent_cost) if spent_cost else 0.0
            if self.log:
                logger.info("[%s] cell %d/%d %s %s| elapsed %s, ETA %s", self.name, i, len(cells), cell.label,
                            describe(result) + " " if describe(result) else "", _format_seconds(elapsed),
                            _format_seconds(eta))
        return results
