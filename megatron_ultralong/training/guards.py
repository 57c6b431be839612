"""What stops a run before it wastes GPU-hours: bad numbers, preemption, time limits.

- `NonFiniteGuard`: loss and gradient norm checked every step, as Megatron-LM does
  (`check_for_nan_in_loss_and_grad`); the verdict is all-reduced so every rank skips the same
  update and stops together. A bad step applies no update and is never saved; after
  `train.max_bad_steps` consecutive bad steps the run stops with `NonFiniteError` (exit code 3).
- `StopConditions`: SIGTERM/SIGUSR1 (`train.exit_signals`) and `train.exit_duration_minutes` set a
  flag that is all-reduced after each step, so every rank finishes the same step, saves and stops
  together (exit code `EXIT_SAVED_AND_STOPPED`). A signal never interrupts a step or a save.
- Metrics lines: strict JSON (non-finite numbers become null) and, after a resume, no step twice.

Data and output checks run at start-up: training/startup_checks.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_NON_FINITE = 3
"""Process exit code: stopped on non-finite loss or gradient norm (nothing saved from the bad steps)."""

EXIT_SAVED_AND_STOPPED = 75
"""Process exit code: a checkpoint of the current step was saved and the run stopped early on a
signal or the time limit; requeue to continue (75 = EX_TEMPFAIL, "try again", from sysexits.h)."""


class NonFiniteError(RuntimeError):
    """Loss or gradient norm was NaN/Inf for `max_bad_steps` consecutive steps."""


def _all_reduce_max(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class NonFiniteGuard:
    """Counts consecutive steps whose loss or grad norm is not finite; raises after `max_bad_steps`."""

    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad_steps = max_bad_steps
        self.device = device
        self.consecutive = 0

    def loss_is_finite(self, step: int, loss: float) -> bool:
        """All ranks agree: False if any rank's loss is NaN/Inf (then skip the optimizer step)."""
        local_bad = not math.isfinite(loss)
        if local_bad:
            logger.error("rank %d, step %d: loss is %s", _rank(), step, loss, extra={"all_ranks": True})
        return _all_reduce_max([float(local_bad)], self.device)[0] == 0.0

    def record(self, step: int, loss: float, grad_norm: float, loss_ok: bool) -> Optional[str]:
        """After the step: None if it was good, else which value was bad. Raises NonFiniteError
        when the run has had `max_bad_steps` bad steps in a row."""
        grad_bad = not math.isfinite(grad_norm) and loss_ok
        if grad_bad:
            logger.error("rank %d, step %d: gradient norm is %s", _rank(), step, grad_norm, extra={"all_ranks": True})
        grad_bad = _all_reduce_max([float(grad_bad)], self.device)[0] > 0
        if loss_ok and not grad_bad:
            self.consecutive = 0
            return None
        which = "loss" if not loss_ok else "gradient norm"
        self.consecutive += 1
        if self.consecutive >= self.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: non-finite {which} (loss {loss}, grad norm {grad_norm}) for "
                f"{self.consecutive} consecutive step(s) (train.max_bad_steps={self.max_bad_steps}); "
                "stopping without saving: resume from the last checkpoint with a lower optim.lr or "
                "check the data of these steps"
            )
        logger.warning("step %d: non-finite %s, update skipped (%d of train.max_bad_steps=%d)",
                       step, which, self.consecutive, self.max_bad_steps)
        return which


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class StopConditions:
    """Signals and the wall-clock limit, turned into an agreed 'save now and stop' between steps.

    Install in the main thread (signal handlers). `check()` is collective: call it once per step.
    """

    def __init__(self, exit_signals: Sequence[str], exit_duration_minutes: Optional[float], device: torch.device):
        self.start = time.monotonic()
        self.limit_s = None if exit_duration_minutes is None else exit_duration_minutes * 60.0
        self.device = device
        self.received: Optional[str] = None
        self._previous = {}
        if exit_signals and threading.current_thread() is not threading.main_thread():
            logger.warning("the trainer runs outside the main thread: train.exit_signals not installed")
            exit_signals = ()
        for name in exit_signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        # Only a flag: the step in flight finishes, then `check` makes every rank save together.
        self.received = signal.Signals(signum).name

    def check(self) -> Optional[str]:
        """Collective: the reason to stop now (same on every rank), or None."""
        local = 0.0
        if self.received is not None:
            local = 2.0
        elif self.limit_s is not None and time.monotonic() - self.start >= self.limit_s:
            local = 1.0
        agreed = _all_reduce_max([local], self.device)[0]
        if agreed == 2.0:
            return f"signal {self.received or 'received by another rank'}"
        if agreed == 1.0:
            return f"train.exit_duration_minutes={self.limit_s / 60:g} reached"
        return None

    def restore(self) -> None:
        """Put back the handlers that were installed before (tests run several trainers per process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def json_safe(metrics: dict) -> dict:
    """Non-finite floats -> None, so the line is valid JSON (json.dumps writes bare NaN otherwise)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def metrics_line(metrics: dict) -> str:
    """One strict-JSON line (allow_nan=False: a future non-finite field fails here, not in a reader)."""
    return json.dumps(json_safe(metrics), allow_nan=False) + "\n"


def trim_metrics_log(path: Optional[str], resumed_step: int) -> int:
    """Rank 0, at resume: drop lines of steps after the checkpoint (the killed run logged them; they
    are about to be run again). Rewrites the file atomically; returns how many lines were dropped."""
    if not path or not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except ValueError:
                step = None  # a line torn by the kill: drop it too
                dropped += 1
                continue
            if isinstance(step, int) and step > resumed_step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        logger.info("%s: dropped %d line(s) of steps after %d (re-run after the resume)", path, dropped, resumed_step)
    return dropped
