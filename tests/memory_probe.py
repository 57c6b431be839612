"""Measure a small Llama's activation memory on CPU (run as a script by tests/test_memory_model.py).

    python tests/memory_probe.py SEQ [--mlp-tiles N] [--recompute full] [--offload F]

Prints one JSON line: "peak", the allocator's peak of live bytes during one forward+backward above
what was live before it (a fresh process per length; from the profiler's allocation events, the CPU
counterpart of `torch.cuda.max_memory_allocated`, which is what the model predicts; not the RSS:
glibc malloc keeps freed pages, ~35% above the allocator's peak on the development machine and
varying with the libc and the load, which a GPU's caching allocator does not share); and "saved",
the bytes of the distinct storages autograd holds after a forward.
"""
from __future__ import annotations

import argparse
import json

import torch

from megatron_ultralong.model import build_model
from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime
from megatron_ultralong.rope import RopeConfig

CONFIG = LlamaConfig(
    vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=8, num_kv_heads=2, head_dim=32,
    ffn_hidden_size=704, max_position_embeddings=65536, rope=RopeConfig(theta=500000.0),
)
LOSS_CHUNK = 256


def _allocator_peak(prof) -> int:
    """Peak of the running sum of allocations/frees (bytes) in a profile_memory=True profile."""
    # The "[memory]" events carry signed sizes; torch's own memory timeline
    # (torch/profiler/_memory_profiler.py) reads the same kineto results.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    if not events:
        raise RuntimeError("the profiler recorded no CPU memory events")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main(seq: int, mlp_tiles: int = 1, recompute: str = "none", offload: float = 0.0) -> dict:
    torch.set_num_threads(1)
    rt = init_runtime(ParallelConfig(), device="cpu")
    overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute == "full" else {}
    model = build_model(CONFIG, rt, loss_chunk_tokens=LOSS_CHUNK, mlp_tiles=mlp_tiles, **overrides)
    pool = None
    if offload:
        from megatron_ultralong.model.activation_offload import ActivationOffload, ByteStorePool

        pool = ActivationOffload(model.decoder, offload, ByteStorePool()).pool
    ids = torch.randint(0, CONFIG.vocab_size, (1, seq))
    pos = torch.arange(seq)[None]
    try:
        # Warm-up on a short sequence: threads, kernels and allocator pools join the baseline.
        model(ids[:, :LOSS_CHUNK], pos[:, :LOSS_CHUNK], None, labels=ids[:, :LOSS_CHUNK]).sum().backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            model(ids, pos, None, labels=ids).sum().backward()
        peak = _allocator_peak(prof)
        offloaded = pool.stored_bytes if pool is not None else 0
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in params:
                storages[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, pos, None, labels=ids)
        return {"seq": seq, "peak": peak, "saved": sum(storages.values()), "offloaded": offloaded}
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("seq", type=int)
    parser.add_argument("--mlp-tiles", type=int, default=1)
    parser.add_argument("--recompute", choices=("none", "full"), default="none")
    parser.add_argument("--offload", type=float, default=0.0)
    a = parser.parse_args()
    print(json.dumps(main(a.seq, a.mlp_tiles, a.recompute, a.offload)))
