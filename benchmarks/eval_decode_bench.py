"""CPU benchmark: cached decoding from the CP-sharded KV cache vs re-prefilling per token, at CP=2.

The Megatron evaluation backend used to generate each token by re-running the CP prefill of the
prompt plus the tokens so far (O(T n^2)); it now prefills once and decodes from each rank's cache
shard (eval/kv_cache.py). For one tiny random Llama (the same weights for both modes) and each
prompt length, two gloo processes (1 thread each) time, interleaved and repeated:

- cached:     `MegatronBackend.generate(ids, T)` = one prefill + T - 1 cached steps;
- re-prefill: the old algorithm, T x `next_token_logits(ids + generated so far)`;
- prefill:    one prefill alone, and the mean time of one cached decode step.

Both modes must produce the same T tokens (checked every run). Time = slowest rank, median over
--repeats. Prints a markdown table plus the machine and load average.

    .venv/bin/python benchmarks/eval_decode_bench.py --lengths 1024 2048 4096 8192 16384

`--predict` instead prints the FLOP-count cost model of docs/evaluation.md (Llama-3.1-8B, the
README's 1M NIAH command on 8 H100s, before and after cached decoding).
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ANSWER_TOKENS = 10


def _tiny_hf(vocab: int = 512):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=32768, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _worker(rank: int, world: int, port: int, lengths: list[int], repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_ultralong.convert.model_weights import load_hf_weights
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.model import LlamaConfig, build_model
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    rt = init_runtime(ParallelConfig(context_parallel=world), device="cpu")
    hf = _tiny_hf()
    cfg = LlamaConfig.from_hf(hf.config)
    model = build_model(cfg, rt)
    load_hf_weights(model, cfg, hf.state_dict().__getitem__, rt.pg_collection.tp)
    backend = MegatronBackend(model, rt)
    g = torch.Generator().manual_seed(1)

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank
        return out, float(t)

    def reprefill(ids):
        seq, out = list(ids), []
        for _ in range(ANSWER_TOKENS):
            out.append(int(backend.next_token_logits(seq).argmax()))
            seq.append(out[-1])
        return out

    def prefill_and_steps(ids):
        state, logits = backend.prefill(ids)
        token, times = int(logits.argmax()), []
        for _ in range(ANSWER_TOKENS - 1):
            t0 = time.perf_counter()
            token = int(backend.step(state, token).argmax())
            times.append(time.perf_counter() - t0)
        return times

    rows = []
    for n in lengths:
        ids = torch.randint(0, 512, (n,), generator=g).tolist()
        cached_t, re_t, prefill_t, step_t = [], [], [], []
        for r in range(repeats):
            # Alternate the order so a load change on the shared machine hits both modes alike.
            for mode in (("cached", "re") if r % 2 == 0 else ("re", "cached")):
                if mode == "cached":
                    got_cached, t = timed(lambda: backend.generate(ids, ANSWER_TOKENS))
                    cached_t.append(t)
                else:
                    got_re, t = timed(lambda: reprefill(ids))
                    re_t.append(t)
            assert got_cached == got_re, f"n={n}: cached {got_cached} != re-prefill {got_re}"
            _, t = timed(lambda: backend.next_token_logits(ids))
            prefill_t.append(t)
            steps, _ = timed(lambda: prefill_and_steps(ids))
            step_t.append(statistics.median(steps))
        rows.append((n, statistics.median(cached_t), statistics.median(re_t), statistics.median(prefill_t),
                     statistics.median(step_t)))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def predict() -> None:
    """The cost model of docs/evaluation.md, from FLOP counts (bf16 dense, causal attention)."""
    params, layers, heads_dim, n_cells, new_tokens = 8.03e9, 32, 4096, 5, 16
    peak, mfu, gpus = 989e12, 0.4, 8  # H100 SXM bf16 dense peak, assumed utilisation for CP prefill
    bw, kv_bytes_per_token = 3.35e12, 2 * layers * 8 * 128 * 2  # HBM bytes/s; K+V, 8 KV heads x 128, bf16
    lengths = (131072, 262144, 524288, 1048576)

    def prefill_flops(n: int) -> float:
        # 2 FLOPs per parameter per token + causal attention: QK^T and PV, 2 * 2 * n^2/2 * h*d per layer.
        return 2 * params * n + 2 * n * n * heads_dim * layers

    def prefill_s(n: int) -> float:
        return prefill_flops(n) / (gpus * peak * mfu)

    layer_latency = 3e-4  # s per layer per token: kernel launches (eager PyTorch) + one small all-gather

    def step_s(n: int) -> float:
        # Memory-bound: every rank reads its KV shard and all weights (replicated over CP) once per token,
        # plus a fixed per-layer latency that dominates at this size.
        return (n * kv_bytes_per_token / gpus + 2 * params) / bw + layers * layer_latency

    before = sum(n_cells * sum(prefill_s(n + t) for t in range(new_tokens)) for n in lengths)
    after = sum(n_cells * (prefill_s(n) + (new_tokens - 1) * step_s(n)) for n in lengths)
    print("| length | prefill FLOPs | prefill s | cached step s | re-prefill cell s | cached cell s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in lengths:
        cell_before = sum(prefill_s(n + t) for t in range(new_tokens))
        cell_after = prefill_s(n) + (new_tokens - 1) * step_s(n)
        print(f"| {n} | {prefill_flops(n):.2e} | {prefill_s(n):.1f} | {step_s(n):.4f} | {cell_before:.0f} | "
              f"{cell_after:.1f} |")
    print(f"grid of {len(lengths)} lengths x {n_cells} depths, {new_tokens} new tokens: before {before / 60:.0f} min,"
          f" after {after / 60:.1f} min ({before / after:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="prompt lengths in tokens")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions per length (median)")
    parser.add_argument("--predict", action="store_true", help="print the 8-H100 1M NIAH cost model and exit")
    args = parser.parse_args()
    if args.predict:
        predict()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args.lengths, args.repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or queue.empty():
        raise SystemExit(f"benchmark worker failed: exit codes {[p.exitcode for p in procs]}")
    rows = queue.get()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; "
          f"wall {time.perf_counter() - t0:.0f} s")
    print(f"CP=2 (gloo, 1 thread per rank), {ANSWER_TOKENS}-token answer, median of {args.repeats}")
    print("| prompt | re-prefill s | cached s | re-prefill / cached | one prefill s | decode step ms | "
          "step / prefill |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, cached, re, prefill, step in rows:
        print(f"| {n} | {re:.2f} | {cached:.2f} | {re / cached:.1f}x | {prefill:.2f} | {1000 * step:.1f} | "
              f"{step / prefill:.4f} |")


if __name__ == "__main__":
    main()
