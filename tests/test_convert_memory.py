"""Both conversion directions stream: converting a 188 MiB model raises the process's peak RSS by
about two of its largest tensor (16 MiB) plus a fixed part, not by the model's size.

Measured inside one fresh process (a world of one rank, the CLI's default) from the kernel's own
high-water mark: `/proc/self/clear_refs` resets VmHWM to the current RSS just before each
conversion, and VmHWM afterwards is the peak the conversion reached. A converter that fills the
whole stage (the earlier hf-to-mcore) or loads it whole (the earlier mcore-to-hf in one process)
rises by >= the model's size and fails. The exported weights are checked bit-exact against the
source, tensor by tensor.

How the peak scales with the largest tensor and the depth is measured by
`benchmarks/convert_bench.py --sweep` (docs/benchmarks.md); this test only pins the bound.
"""
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_rise_mib(fn) -> float:
    """How far VmHWM rises above the live memory at the call while fn() runs (MiB). Freed heap
    pages are handed back first, so what fn allocates cannot hide in them."""
    from megatron_ultralong.convert.heap import release_freed_memory

    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    start = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - start) / 1024


def _write_random_hf(cfg, path: Path) -> tuple[int, int]:
    """A random fp32 HF checkpoint of cfg's shape (4 MB shards); returns (total, largest) bytes."""
    from megatron_ultralong.convert.hf_io import write_hf_config
    from megatron_ultralong.convert.hf_shards import HFShardWriter, finish_hf_shards
    from megatron_ultralong.convert.key_map import expected_hf_shapes

    shapes = expected_hf_shapes(cfg)
    path.mkdir()
    writer = HFShardWriter(path, [(n, torch.float32, s) for n, s in shapes.items()], "4MB")
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, generator=g))
    writer.close()
    finish_hf_shards(path, writer.shards, writer.total_bytes)
    write_hf_config(path, cfg.to_hf(torch_dtype="float32"))
    sizes = [torch.Size(s).numel() * 4 for s in shapes.values()]
    return sum(sizes), max(sizes)


def _convert_both_ways(rank, world_size, root):
    from megatron_ultralong.convert.hf_io import HFCheckpointReader
    from megatron_ultralong.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_ultralong.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_ultralong.model.config import LlamaConfig
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    # 12 layers of 13 MiB + two 16 MiB vocab matrices: 188 MiB of weights, largest tensor 16 MiB.
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, num_layers=12, num_attention_heads=8, num_kv_heads=2,
                      head_dim=64, ffn_hidden_size=1792)
    root = Path(root)
    total, largest = _write_random_hf(cfg, root / "hf")
    rt = init_runtime(ParallelConfig(1, 1), device="cpu")
    budget = 2 * largest / MiB + 48  # 80 MiB: 2 x largest + the fixed part (~30-50 MiB) with margin
    assert budget < total / MiB / 2

    rise = _peak_rise_mib(lambda: convert_hf_to_mcore(root / "hf", root / "mc", rt, progress=False))
    assert rise < budget, f"hf-to-mcore peak RSS rose {rise:.0f} MiB for a {total / MiB:.0f} MiB model"
    rise = _peak_rise_mib(lambda: convert_mcore_to_hf(root / "mc", root / "back", rt, progress=False,
                                                      max_shard_size="8MB"))
    assert rise < budget, f"mcore-to-hf peak RSS rose {rise:.0f} MiB for a {total / MiB:.0f} MiB model"

    src, back = HFCheckpointReader(root / "hf"), HFCheckpointReader(root / "back")
    assert src.names() == back.names()
    for name in src.names():
        assert torch.equal(src.get(name), back.get(name)), name


def test_conversion_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here ({e})")
    run_distributed(_convert_both_ways, world_size=1, args=(str(tmp_path),))
