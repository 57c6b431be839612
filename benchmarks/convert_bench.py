"""Checkpoint conversion benchmark: wall time and peak RSS, HF -> Megatron -> HF, Llama-3.2-1B shape.

    .venv/bin/python benchmarks/convert_bench.py --workdir /tmp/convert_bench [--preset llama3.2-1b]

Generates a random bf16 checkpoint of the preset's shape with safetensors directly (no transformers
init: minutes saved), sharded like HF's, then runs as separate processes, each measured:
  1. baseline: transformers `AutoModelForCausalLM.from_pretrained` + a full `state_dict()` copy
     (what a naive converter holds);
  2. `tools/convert_checkpoint.py hf-to-mcore` (1 process, TP=PP=1);
  3. `tools/convert_checkpoint.py mcore-to-hf` (its default: 2 processes, see cli.py).
Peak RSS is reported for the largest process (wait4's ru_maxrss) and summed over the process tree
(sampled from /proc every 50 ms).
Prints a markdown table; --keep leaves the generated checkpoints (default: deleted).
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

from megatron_ultralong.convert.hf_io import HFCheckpointWriter, finish_hf_shards, write_hf_config  # noqa: E402
from megatron_ultralong.convert.hf_to_mcore import expected_hf_shapes  # noqa: E402
from megatron_ultralong.model.config import PRESETS  # noqa: E402

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
sd = {k: v.clone() for k, v in m.state_dict().items()}
print(sum(v.numel() for v in sd.values()))
"""


def generate(preset: str, out: Path, shard_size: str) -> tuple[int, int]:
    """Random bf16 HF checkpoint of the preset's shape; returns (params, largest tensor bytes)."""
    cfg = PRESETS[preset]
    out.mkdir(parents=True)
    writer = HFCheckpointWriter(out, shard_size)
    g = torch.Generator().manual_seed(0)
    params, largest = 0, 0
    for name, shape in expected_hf_shapes(cfg).items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        t = t.to(torch.bfloat16)
        params += t.numel()
        largest = max(largest, t.numel() * t.element_size())
        writer.add(name, t)
        del t
    writer.flush()
    finish_hf_shards(out, writer.shards, writer.total_bytes)
    write_hf_config(out, cfg.to_hf(torch_dtype="bfloat16"))
    return params, largest


def _tree_rss_kib(root: int) -> int:
    """Sum of VmRSS over root and all its descendants (from /proc)."""
    parent, rss = {}, {}
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
    total = 0
    for pid in rss:
        p = pid
        while p in parent and p != root and p > 1:
            p = parent[p]
        total += rss[pid] if p == root else 0
    return total


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS GiB of the largest process (wait4), peak sum of RSS over the process tree
    GiB (sampled every 50 ms)) of cmd; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak_sum = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_sum = max(peak_sum, _tree_rss_kib(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    reader.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(out)[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, peak_sum / 2**20  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/convert_bench"))
    ap.add_argument("--preset", default="llama3.2-1b")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the generated HF checkpoint")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, mc, back = args.workdir / "hf", args.workdir / "mcore", args.workdir / "hf_back"
    t = time.perf_counter()
    params, largest = generate(args.preset, hf, args.shard_size)
    gen_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    py = sys.executable
    tool = [py, str(REPO / "tools" / "convert_checkpoint.py")]
    try:
        rows = [
            ("baseline: transformers from_pretrained + state_dict copy", measure([py, "-c", BASELINE, str(hf)])),
            ("hf-to-mcore (1 process)", measure(tool + ["hf-to-mcore", str(hf), str(mc), "--no-progress"])),
            ("mcore-to-hf (default: 2 processes, 1 idle replica)",
             measure(tool + ["mcore-to-hf", str(mc), str(back), "--no-progress"])),
            ("mcore-to-hf, --max-shard-size 500MB",
             measure(tool + ["mcore-to-hf", str(mc), str(back) + "_500", "--no-progress", "--max-shard-size", "500MB"])),
        ]
        same = json.loads((hf / "config.json").read_text())["rope_scaling"] == \
            json.loads((back / "config.json").read_text())["rope_scaling"]
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__}")
    print(f"model: {args.preset} shape, {params / 1e9:.2f}B params, {size / 2**30:.2f} GiB bf16 safetensors, "
          f"largest tensor {largest / 2**30:.2f} GiB (generated in {gen_s:.0f} s); rope_scaling kept: {same}")
    base = rows[0][1][2]
    print("| step | wall (s) | peak RSS, largest process (GiB) | peak RSS, all processes (GiB) | vs baseline |")
    print("|---|---|---|---|---|")
    for name, (wall, rss, total) in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} | {total:.2f} | {total / base:.2f}x |")


if __name__ == "__main__":
    main()
