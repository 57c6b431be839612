"""CPU benchmark: one attention layer's forward+backward, CP=2 (gloo) vs a single process.

For each sequence length S and each mode it starts fresh processes (so peak memory is that run's),
times `UltraLongCoreAttention` forward + backward on [S/cp, b, h, d] inputs, records each rank's peak
resident memory above its pre-run level, and for CP runs counts the bytes every rank sends
(`CommStats`) and checks them against `comm.expected_bytes_per_rank`.

Modes: single-1t (one process, 1 thread: the per-core baseline the ratios use), single-2t (one
process, 2 threads: the whole 2-core machine), and CP=2 with p2p, all_gather and a2a (two processes,
1 thread each).

    .venv/bin/python benchmarks/cp_attention_cpu.py --seq-lens 2048 4096 8192 16384

Prints a markdown table (time = slowest rank, median of --iters after one warm-up).
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ultralong.parallel.runtime import free_port

MODES = ("single-1t", "single-2t", "p2p", "all_gather", "a2a")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples resident memory every millisecond; `peak` is the maximum above the start level."""

    def __enter__(self):
        self.start = self.peak_abs = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_abs = max(self.peak_abs, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_abs = max(self.peak_abs, _rss_bytes())

    @property
    def peak(self) -> int:
        return self.peak_abs - self.start


def _worker(rank: int, world: int, port: int, mode: str, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = 2 if mode == "single-2t" else 1
    torch.set_num_threads(threads)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ultralong.attention.comm import CommStats, expected_bytes_per_rank
    from megatron_ultralong.attention.core_attention import UltraLongCoreAttention

    dist.init_process_group("gloo", rank=rank, world_size=world)
    singles = [dist.new_group([r]) for r in range(world)]
    pgc = ProcessGroupCollection(tp=singles[rank], cp=dist.group.WORLD)
    comm = mode if world > 1 else "p2p"
    h, g, d, b = args.heads, args.kv_heads, args.head_dim, args.batch
    config = TransformerConfig(
        num_layers=1, hidden_size=h * d, num_attention_heads=h, num_query_groups=g, kv_channels=d,
        context_parallel_size=world, cp_comm_type=comm, attention_dropout=0.0,
    )
    module = UltraLongCoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgc)
    n = args.seq_len // world
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(n, b, h, d, generator=gen).requires_grad_()
    k = torch.randn(n, b, g, d, generator=gen).requires_grad_()
    v = torch.randn(n, b, g, d, generator=gen).requires_grad_()
    dout = torch.randn(n, b, h * d, generator=gen)

    def step() -> None:
        module(q, k, v, None).backward(dout)

    step()  # warm-up
    times, peaks = [], []
    stats = CommStats()
    for _ in range(args.iters):
        stats.reset()
        module.comm_stats = stats
        q.grad = k.grad = v.grad = None  # freed before the memory baseline is taken
        dist.barrier()
        with _PeakRss() as mem:
            t0 = time.perf_counter()
            step()
            elapsed = time.perf_counter() - t0
        times.append(elapsed)
        peaks.append(mem.peak)
    sent = stats.total_bytes
    expected = sum(expected_bytes_per_rank(comm, world, b, h, g, n, d, 4).values()) if world > 1 else 0
    results.put((rank, statistics.median(times), max(peaks), sent, expected))
    dist.destroy_process_group()


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    world = 1 if mode.startswith("single") else 2
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    env_backup = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    # Large allocations via mmap are returned to the OS on free, so RSS follows live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    procs = [ctx.Process(target=_worker, args=(r, world, port, mode, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if env_backup is None:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_")
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"mode {mode} failed: exit codes {[p.exitcode for p in procs]}")
    rows = [results.get() for _ in range(world)]
    return dict(
        time=max(r[1] for r in rows), peak=max(r[2] for r in rows),
        sent=[r[3] for r in rows], expected=rows[0][4],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    print(f"h={args.heads} g={args.kv_heads} d={args.head_dim} b={args.batch} fp32 causal, "
          f"median of {args.iters} after 1 warm-up")
    print("| S | mode | fwd+bwd s | ratio to single-1t | peak RSS MiB / rank | sent MiB / rank | formula MiB | match |")
    print("|---|---|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        args.seq_len = seq_len
        base = None
        for mode in args.modes:
            res = run_mode(mode, args)
            base = res["time"] if mode == "single-1t" else base
            ratio = f"{res['time'] / base:.2f}" if base else "-"
            match = "-" if mode.startswith("single") else ("yes" if all(s == res["expected"] for s in res["sent"]) else "NO")
            print(f"| {seq_len} | {mode} | {res['time']:.3f} | {ratio} | {res['peak'] / 2**20:.1f} | "
                  f"{max(res['sent']) / 2**20:.2f} | {res['expected'] / 2**20:.2f} | {match} |", flush=True)


if __name__ == "__main__":
    main()
