"""Measure a small Llama's activation memory on CPU (run as a script by tests/test_memory_model.py).

    python tests/memory_probe.py SEQ

Prints one JSON line: "peak", the peak RSS of one forward+backward above a warm baseline (a fresh
process per length; the kernel's VmHWM, reset just before the step), and "saved", the bytes of the distinct
storages autograd holds after a forward (measured second; a forward alone does not raise the peak).
"""
from __future__ import annotations

import json
import sys

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


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(seq: int) -> dict:
    torch.set_num_threads(1)
    rt = init_runtime(ParallelConfig(), device="cpu")
    model = build_model(CONFIG, rt, loss_chunk_tokens=LOSS_CHUNK)
    ids = torch.randint(0, CONFIG.vocab_size, (1, seq))
    pos = torch.arange(seq)[None]
    try:
        # Warm-up on a short sequence: threads, kernels and allocator pools join the baseline.
        model(ids[:, :LOSS_CHUNK], pos[:, :LOSS_CHUNK], None, labels=ids[:, :LOSS_CHUNK]).sum().backward()
        # ru_maxrss never goes down, so an import that peaked higher (transformers 5 does) would hide
        # the step's peak: reset the kernel's high-water mark and read VmHWM instead.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _vm_kib("VmHWM")
        model(ids, pos, None, labels=ids).sum().backward()
        peak = (_vm_kib("VmHWM") - base) * 1024
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in params:
                storages[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, pos, None, labels=ids)
        return {"seq": seq, "peak": peak, "saved": sum(storages.values())}
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
