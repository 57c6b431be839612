"""Rank-aware logging for the whole package: one logger per module, rank 0 by default.

Library modules call `logging.getLogger(__name__)` and never print. Entry points call
`setup_logging()` once: it installs one handler on the package's root logger whose records carry
the process's global rank, and drops records from ranks other than 0 unless `all_ranks=True`
(or `MU_LOG_ALL_RANKS=1`) — a 256-GPU job would otherwise print every line 256 times. A record
can ask to be kept on every rank with `extra={"all_ranks": True}` (e.g. "rank 17 saw NaN").

The rank is read from torch.distributed when it is initialised and from torchrun's `RANK`
environment variable before that, so lines logged before `init_process_group` are filtered too.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

PACKAGE_LOGGER = "megatron_ultralong"
_HANDLER_NAME = "megatron_ultralong.rank_handler"


def global_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else torchrun's RANK, else 0."""
    # Only when torch is already imported: a process that never imported it has no process group,
    # and importing it here (2 s) for a log line would dominate the dataset builder's start-up.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    """Stamps `record.rank`; drops records of ranks other than 0 unless told otherwise."""

    def __init__(self, all_ranks: bool) -> None:
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = global_rank()
        return self.all_ranks or record.rank == 0 or bool(getattr(record, "all_ranks", False))


def setup_logging(level: int | str = logging.INFO, all_ranks: Optional[bool] = None,
                  stream=None) -> logging.Logger:
    """Install (once; later calls update it) the package's rank-aware handler and return its logger.

    level: threshold for the package's loggers (e.g. logging.INFO, "DEBUG").
    all_ranks: log from every rank; default from the MU_LOG_ALL_RANKS environment variable.
    stream: where lines go (default sys.stdout, which Slurm captures per task).
    """
    if all_ranks is None:
        all_ranks = os.environ.get("MU_LOG_ALL_RANKS", "0") not in ("", "0", "false", "False")
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    logger.propagate = False
    stream = stream or sys.stdout  # looked up now: a caller (or pytest) may have replaced sys.stdout
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
    else:
        # Not setStream(): it flushes the old stream, which may be closed by now.
        handler.acquire()
        try:
            handler.stream = stream
        finally:
            handler.release()
    for f in list(handler.filters):
        handler.removeFilter(f)
    handler.addFilter(_RankFilter(all_ranks))
    fmt = "[%(asctime)s rank %(rank)s] %(message)s" if all_ranks else "[%(asctime)s] %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    return logger
