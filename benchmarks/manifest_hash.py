"""Cost of the checkpoint manifest's hash (checkpoint/manifest.py) on one large file.

Streams a file in 8 MiB blocks through: nothing (the read alone: the baseline, the least any
verification pays), zlib.crc32 (what the manifest uses), hashlib.blake2b and hashlib.sha256.
Modes are interleaved, repeated, and the median taken, of wall time and of this process's CPU time
(the CPU figure is the one that survives a machine shared with other jobs); the file is read once first so every mode
reads from the page cache (a cold read adds the disk's time to every mode alike).

    python benchmarks/manifest_hash.py --size-gb 1 --repeats 3
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib

BLOCK = 8 << 20


def _read_only(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(BLOCK):
            pass


def _crc32(path: str) -> None:
    from megatron_ultralong.checkpoint.manifest import file_crc32

    file_crc32(path)


def _hashlib(name: str):
    def run(path: str) -> None:
        h = hashlib.new(name)
        with open(path, "rb") as f:
            while block := f.read(BLOCK):
                h.update(block)
        h.hexdigest()
    return run


MODES = {"read only": _read_only, "crc32 (manifest)": _crc32, "blake2b": _hashlib("blake2b"), "sha256": _hashlib("sha256")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the test file (default: tmp)")
    args = parser.parse_args()
    size = int(args.size_gb * (1 << 30))
    with tempfile.NamedTemporaryFile(dir=args.dir, delete=False) as f:
        path = f.name
        chunk = os.urandom(BLOCK)
        for _ in range(size // BLOCK):
            f.write(chunk)
    try:
        _read_only(path)  # warm the page cache
        times = {m: [] for m in MODES}
        cpu = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for name, fn in MODES.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn(path)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        gib = size / 2**30
        base, base_cpu = statistics.median(times["read only"]), statistics.median(cpu["read only"])
        print(f"file {gib:.2f} GiB, median of {args.repeats}, load average {os.getloadavg()}")
        print("| mode | wall s per GiB | ratio to read only | CPU s per GiB | ratio to read only |")
        print("|---|---|---|---|---|")
        for name in MODES:
            w, c = statistics.median(times[name]), statistics.median(cpu[name])
            print(f"| {name} | {w / gib:.3f} | {w / base:.2f} | {c / gib:.3f} | {c / base_cpu:.2f} |")
    finally:
        os.remove(path)


if __name__ == "__main__":
    main()
