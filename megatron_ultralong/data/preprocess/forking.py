"""Children forked by a build (tokenizer workers, the histogram painter) never run the build's
own signal handlers.

A forked child starts with its parent's Python signal handlers. The builder's SIGTERM handler
raises to unwind the build's outputs, and Ctrl-C is the parent's to handle; in a child either would
at best print a traceback and at worst be swallowed: a SIGTERM that arrives while the child runs
its at-fork callbacks is reported as "Exception ignored" and lost, so a `terminate()` sent right
after the fork leaves the child running and the parent's `join()` waiting for ever. So the parent
forks with SIGINT ignored (inherited: the child ignores it from its first instruction) and SIGTERM
blocked (the mask is inherited, a signal sent meanwhile stays pending), and the child, first thing,
restores SIGTERM's default action and unblocks it. The parent's own handlers are back once the
children exist, milliseconds later; a signal sent to the parent meanwhile is delivered then
(SIGTERM) or lost (SIGINT).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def forking_without_handlers() -> Iterator[None]:
    """Fork children inside this block (module docstring)."""
    main = threading.current_thread() is threading.main_thread()  # signal.signal's precondition
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous_int)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def child_signals() -> None:
    """First thing in a forked child: SIGINT ignored (the parent unwinds and ends its children),
    SIGTERM's default action (`terminate()` ends the child), then SIGTERM unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
