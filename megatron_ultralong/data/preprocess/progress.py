"""Progress for interactive runs and batch logs alike.

On a terminal: a tqdm bar over the input's bytes (so it has a total and an ETA), with documents
and tokens in its postfix. Not on a terminal (Slurm, `nohup`, a pipe), a redrawn bar is noise or
nothing: a status line is logged every `interval_s` seconds instead, with documents, tokens, MB/s,
percent done and ETA, plus one at the end.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

logger = logging.getLogger(__name__)


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StageProgress:
    """Progress of one stage over a known amount of work (`total`, in `unit`s)."""

    def __init__(self, stage: str, total: int, unit: str = "B", enabled: Optional[bool] = None,
                 interval_s: float = 30.0, stream=None):
        stream = stream or sys.stderr
        self.stage, self.total, self.unit, self.interval_s = stage, max(0, int(total)), unit, interval_s
        self.done = self.docs = self.tokens = 0
        self.start = self.last_line = time.monotonic()
        self.enabled = enabled is not False
        self.bar = None
        if self.enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=stage, total=self.total or None, unit=unit, unit_scale=True,
                            unit_divisor=1000, smoothing=0.1, mininterval=1.0, file=stream)

    def update(self, amount: int, docs: int = 0, tokens: int = 0) -> None:
        self.done += amount
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(amount)
            self.bar.set_postfix(docs=f"{self.docs:,}", tokens=f"{self.tokens:,}", refresh=False)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval_s:
            self.last_line = time.monotonic()
            logger.info(self.status_line())

    def status_line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.stage}: {self.docs:,} docs, {self.tokens:,} tokens"]
        if self.unit == "B":
            parts.append(f"{rate / 1e6:.1f} MB/s")
        else:
            parts.append(f"{rate:,.0f} {self.unit}/s")
        if self.total:
            frac = min(1.0, self.done / self.total)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            parts.append(f"{frac:.1%} of {self.total / 1e6:,.1f} M{self.unit}" if self.unit != "B"
                         else f"{frac:.1%} of {self.total / 1e6:,.1f} MB")
            parts.append(f"ETA {_eta(eta)}" if eta != float("inf") else "ETA ?")
        parts.append(f"elapsed {_eta(elapsed)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            logger.info(self.status_line() + " (done)")
