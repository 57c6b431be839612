"""Checkpoint conversion benchmark: wall time and peak RSS, HF -> Megatron -> HF, Llama-3.2-1B shape.

    .venv/bin/python benchmarks/convert_bench.py --workdir /tmp/convert_bench [--preset llama3.2-1b]

Generates a random bf16 checkpoint of the preset's shape with safetensors directly (no transformers
init: minutes saved), sharded like HF's, then runs as separate processes, each measured:
  1. baseline: transformers `AutoModelForCausalLM.from_pretrained` + a full `state_dict()` copy
     (what a naive converter holds);
  2. `tools/convert_checkpoint.py hf-to-mcore` (its default: 1 process, TP=PP=1);
  3. `tools/convert_checkpoint.py mcore-to-hf` (its default: 1 process), at 1 GB and 500 MB shards;
and, for the goal (peak <= about 2 x the largest tensor + a fixed overhead), a process that only
imports the converter and starts its runtime. Peak RSS is reported for the largest process (its
VmHWM) and summed over the process tree (VmRSS), both sampled from /proc every 50 ms. Afterwards
every exported tensor is compared with the source, one tensor at a time.
Prints a markdown table; --keep leaves the generated checkpoints (default: deleted).

    .venv/bin/python benchmarks/convert_bench.py --sweep --workdir /tmp/convert_sweep

instead converts small models (2 or 12 layers of hidden 1024, vocab 2048 to 65536) both ways and
prints each step's peak above the fixed overhead next to the largest tensor: it should follow the
largest tensor, not the number of layers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_ultralong.convert.hf_io import HFCheckpointReader, write_hf_config  # noqa: E402
from megatron_ultralong.convert.hf_shards import HFShardWriter, finish_hf_shards  # noqa: E402
from megatron_ultralong.convert.key_map import expected_hf_shapes  # noqa: E402
from megatron_ultralong.model.config import PRESETS, LlamaConfig  # noqa: E402

# What every conversion process holds before it touches a weight: the converter's imports (torch,
# megatron-core, transformers) and a 1-process gloo runtime. The memory goal (docs/benchmarks.md) is measured against it.
OVERHEAD = """
import megatron_ultralong.convert.cli, megatron_ultralong.convert.hf_to_mcore, megatron_ultralong.convert.mcore_to_hf
from megatron_ultralong.parallel.runtime import free_port
import os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime
init_runtime(ParallelConfig(1, 1), device="cpu")
"""

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
sd = {k: v.clone() for k, v in m.state_dict().items()}
print(sum(v.numel() for v in sd.values()))
"""


def generate(cfg: LlamaConfig, out: Path, shard_size: str) -> tuple[int, int]:
    """Random bf16 HF checkpoint of cfg's shape; returns (params, largest tensor bytes)."""
    out.mkdir(parents=True)
    shapes = expected_hf_shapes(cfg)
    writer = HFShardWriter(out, [(name, torch.bfloat16, shape) for name, shape in shapes.items()], shard_size)
    g = torch.Generator().manual_seed(0)
    params, largest = 0, 0
    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        t = t.to(torch.bfloat16)
        params += t.numel()
        largest = max(largest, t.numel() * t.element_size())
        writer.add(name, t)
        del t
    writer.close()
    finish_hf_shards(out, writer.shards, writer.total_bytes)
    write_hf_config(out, cfg.to_hf(torch_dtype="bfloat16"))
    return params, largest


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of HF checkpoint `a` equals the same-named one in `b` (and no others), read one
    at a time."""
    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    return ra.names() == rb.names() and all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def _tree_memory_kib(root: int) -> tuple[int, dict[int, int]]:
    """(sum of VmRSS over root and its descendants, {pid: VmHWM}) from /proc."""
    parent, rss, hwm = {}, {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        parent[int(d)] = int(fields["PPid"])
        rss[int(d)] = int(fields.get("VmRSS", "0 kB").split()[0])
        hwm[int(d)] = int(fields.get("VmHWM", "0 kB").split()[0])
    in_tree = []
    for pid in rss:
        p = pid
        while p in parent and p != root and p > 1:
            p = parent[p]
        if p == root:
            in_tree.append(pid)
    return sum(rss[p] for p in in_tree), {p: hwm[p] for p in in_tree}


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS GiB of the largest process, peak sum of RSS over the process tree GiB) of
    cmd; raises if it fails. Both are sampled from /proc every 50 ms: a process's own VmHWM (its
    high-water mark since exec; wait4's ru_maxrss would carry over the benchmark's own peak through
    fork + exec) and the tree's summed VmRSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak_sum, peak_one = 0, 0
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        total, hwm = _tree_memory_kib(proc.pid)
        peak_sum, peak_one = max(peak_sum, total), max([peak_one, *hwm.values()])
        time.sleep(0.05)
    wall = time.perf_counter() - start
    reader.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(out)[-3000:]}")
    return wall, peak_one / 2**20, peak_sum / 2**20  # KiB -> GiB


def sweep(workdir: Path, tool: list[str], overhead_gib: float) -> None:
    """Peak above the fixed overhead vs the largest tensor, for models that differ in depth and
    vocabulary (one process per conversion, default flags)."""
    print("| layers | vocab | model (MiB) | largest tensor (MiB) | hf-to-mcore peak - overhead (MiB) "
          "| mcore-to-hf peak - overhead (MiB) |")
    print("|---|---|---|---|---|---|")
    for layers, vocab in ((2, 16384), (12, 16384), (12, 2048), (12, 65536)):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=1024, num_layers=layers, num_attention_heads=8,
                          num_kv_heads=2, head_dim=128, ffn_hidden_size=3584)
        root = workdir / f"l{layers}_v{vocab}"
        params, largest = generate(cfg, root / "hf", "100MB")
        try:
            up = measure(tool + ["hf-to-mcore", str(root / "hf"), str(root / "mc"), "--no-progress"])[1]
            down = measure(tool + ["mcore-to-hf", str(root / "mc"), str(root / "back"), "--no-progress"])[1]
            assert same_tensors(root / "hf", root / "back"), f"{root}: round trip differs"
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"| {layers} | {vocab} | {params * 2 / 2**20:.0f} | {largest / 2**20:.0f} | "
              f"{(up - overhead_gib) * 1024:.0f} | {(down - overhead_gib) * 1024:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/convert_bench"))
    ap.add_argument("--preset", default="llama3.2-1b")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the generated HF checkpoint")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="peak vs largest tensor over small models instead")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    py = sys.executable
    tool = [py, str(REPO / "tools" / "convert_checkpoint.py")]
    if args.sweep:
        overhead = measure([py, "-c", OVERHEAD])[1]
        print(f"fixed overhead (converter imports + 1-process runtime, no weights): {overhead:.2f} GiB")
        sweep(args.workdir, tool, overhead)
        return
    hf, mc, back = args.workdir / "hf", args.workdir / "mcore", args.workdir / "hf_back"
    t = time.perf_counter()
    params, largest = generate(PRESETS[args.preset], hf, args.shard_size)
    gen_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    try:
        overhead = measure([py, "-c", OVERHEAD])
        rows = [
            ("baseline: transformers from_pretrained + state_dict copy", measure([py, "-c", BASELINE, str(hf)])),
            ("hf-to-mcore (default: 1 process)", measure(tool + ["hf-to-mcore", str(hf), str(mc), "--no-progress"])),
            ("mcore-to-hf (default: 1 process, 1 GB shards)",
             measure(tool + ["mcore-to-hf", str(mc), str(back), "--no-progress"])),
            ("mcore-to-hf, --max-shard-size 500MB",
             measure(tool + ["mcore-to-hf", str(mc), str(back) + "_500", "--no-progress", "--max-shard-size", "500MB"])),
        ]
        same = json.loads((hf / "config.json").read_text())["rope_scaling"] == \
            json.loads((back / "config.json").read_text())["rope_scaling"]
        exact = same_tensors(hf, back) and same_tensors(hf, Path(str(back) + "_500"))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__}")
    print(f"model: {args.preset} shape, {params / 1e9:.2f}B params, {size / 2**30:.2f} GiB bf16 safetensors, "
          f"largest tensor {largest / 2**30:.2f} GiB (generated in {gen_s:.0f} s); rope_scaling kept: {same}; "
          f"HF -> Megatron -> HF bit-exact: {exact}")
    goal = 2 * largest / 2**30 + overhead[1]
    print(f"fixed overhead (converter imports + 1-process runtime, no weights): {overhead[1]:.2f} GiB; "
          f"goal = 2 x largest tensor + overhead = {goal:.2f} GiB")
    base = rows[0][1][2]
    print("| step | wall (s) | peak RSS, largest process (GiB) | peak RSS, all processes (GiB) | vs baseline |")
    print("|---|---|---|---|---|")
    for name, (wall, rss, total) in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} | {total:.2f} | {total / base:.2f}x |")


if __name__ == "__main__":
    main()
