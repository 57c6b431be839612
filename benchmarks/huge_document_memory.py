"""Peak memory of a build whose corpus holds one huge document, against the same corpus without
it, on both tokenizer backends (the dataset builder's bound: within 2x).

    .venv/bin/python benchmarks/huge_document_memory.py --corpus bench_out/tokenize/corpus_20mb.jsonl \
        --tokenizer bench_out/tokenize/tokenizer_llama3_im1.json --doc-mb 50 --workers 2

The huge document is made of the corpus's own texts glued with assorted whitespace and written as
one JSONL record at the end of a copy of the corpus. Each build runs as a fresh
builder process. Reported: each process's own VmHWM (the builder's main process, the largest of
its children: the workers and the histogram painter) and the peak of their summed PSS, sampled
every 20 ms: what a cgroup/Slurm memory limit counts, each page once. (Summed RSS would count the
pages forked workers share with the main process, its tokenizer's among them, once per process.) Prints one JSON line per build and a summary; the proof cache is warmed first so that
every timed build does the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Run in a child. Peaks are each process's own VmHWM, not wait4's ru_maxrss: Linux carries a
# parent's peak RSS into a child's ru_maxrss through fork + exec, so this script's own peak (it
# builds the 50 MB document) would show up as the builder's. Workers are sampled every 20 ms.
_WRAPPER = r"""
import json, os, sys, threading, time
from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.recipe import recipe_from_dict

def status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0

def children():
    me = str(os.getpid())
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and f.read().rsplit(")", 1)[1].split()[1] == me:
                    yield int(d)
        except OSError:
            pass

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

worker_kb = tree_kb = 0
def sample():
    global worker_kb, tree_kb
    while True:
        kids = list(children())
        worker_kb = max([worker_kb] + [status_kb(c, "VmHWM") for c in kids])
        tree_kb = max(tree_kb, pss_kb("self") + sum(pss_kb(c) for c in kids))
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
report = build_dataset(recipe_from_dict(json.loads(sys.argv[1])), progress=False)
print(json.dumps({"main_kb": status_kb("self", "VmHWM"), "worker_kb": worker_kb, "tree_kb": tree_kb,
                  "tokens": report["output"]["tokens"], "backend": report["tokenizer"]["backend"]}))
"""


def write_corpus_with_huge_document(corpus: str, out: str, doc_mb: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    glue = [" ", "\n", "\n\n", "  ", "\t", "\r\n", " 123 "]
    texts = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
    parts, size = [], 0
    while size < doc_mb * 1e6:
        t = rng.choice(texts) + rng.choice(glue)
        parts.append(t)
        size += len(t.encode("utf-8"))
    with open(out + ".tmp", "w", encoding="utf-8") as dst, open(corpus, encoding="utf-8") as src:
        for line in src:
            dst.write(line)
        dst.write(json.dumps({"text": "".join(parts), "domain": "books"}, ensure_ascii=False) + "\n")
    os.replace(out + ".tmp", out)


def run(corpus: str, tokenizer: str, prefix: str, fast_path: str, workers: int, cache: str) -> dict:
    raw = {"inputs": [corpus], "workers": workers,
           "tokenizer": {"path": tokenizer, "fast_path": fast_path, "proof_cache_dir": cache},
           "output": {"prefix": prefix, "overwrite": True}}
    out = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(raw)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"main_mb": round(res["main_kb"] / 1024), "worker_mb": round(res["worker_kb"] / 1024),
            "tree_mb": round(res["tree_kb"] / 1024),
            "tokens": res["tokens"], "backend": res["backend"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--doc-mb", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_out", "huge_doc"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    big = os.path.join(args.out, f"corpus_plus_{args.doc_mb:g}mb_doc.jsonl")
    if not os.path.exists(big):
        write_corpus_with_huge_document(args.corpus, big, args.doc_mb)
    cache = os.path.join(args.out, "proof_cache")
    run(args.corpus, args.tokenizer, os.path.join(args.out, "warm"), "auto", args.workers, cache)
    summary = {}
    for fast_path in ("auto", "off"):
        rows = {}
        for name, corpus in (("without", args.corpus), ("with", big)):
            rows[name] = run(corpus, args.tokenizer, os.path.join(args.out, f"{fast_path}_{name}"),
                             fast_path, args.workers, cache)
            print(fast_path, name, json.dumps(rows[name]), flush=True)
        largest = {k: max(r["main_mb"], r["worker_mb"]) for k, r in rows.items()}
        summary[rows["with"]["backend"]] = {
            **rows, "ratio_tree": round(rows["with"]["tree_mb"] / rows["without"]["tree_mb"], 2),
            "ratio_largest_process": round(largest["with"] / largest["without"], 2)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
