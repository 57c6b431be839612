"""Run a test body in N local processes over gloo (CPU) and surface every rank's failure.

Usage (the body must be a module-level function so it pickles)::

    def _body(rank: int, world_size: int, arg):
        ...  # torch.distributed is initialised, default group = all ranks

    def test_something():
        run_distributed(_body, world_size=2, args=(arg,))

Each rank runs in a fresh `spawn` process (no inherited state). An exception on any rank is re-raised
in the parent with that rank's traceback, so pytest shows where it failed.
"""
from __future__ import annotations

import os
import traceback
from typing import Any, Callable, Sequence

import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ultralong.parallel.runtime import free_port


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any], errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        # One thread per process: 2-4 processes share this machine's 2 cores.
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 300) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes; raise if any rank fails."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, tuple(args), errors), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        rank, tb = sorted(failures)[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout}s (deadlock?)")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"processes exited non-zero: {bad}")
