"""Dataset-builder throughput and memory vs Megatron-LM's preprocess_data.py method.

Generates its own corpus (synthetic JSONL, N MB and 2N MB) and a ~100K-token byte-level BPE of
Llama-3's kind, then times, on the same cores, each as a separate process:
  baseline   benchmarks/preprocess_data_baseline.py (preprocess_data.py's loop, re-implemented)
  hf_batch   HF `tokenizers` encode_batch alone (texts pre-parsed; tokenization only)
  builder    tools/build_dataset.py's `build_dataset`, tiktoken fast path (auto): N with the
             equivalence proof run cold, N again with the proof's sweep cached, 2N cached
  builder_hf the same with tokenizer.fast_path=off (HF fallback), N
All builder runs are end to end: start-up, equivalence proof, stats, report and renames included.
The builder writes separator-free, EOS-terminated documents so its .bin must equal the baseline's
byte for byte; that is checked. Peak RSS: the builder's own process (ru_maxrss) and the whole
process tree (main + workers, summed VmRSS and RssAnon (heap, excluding mapped files) sampled every 0.1 s).

    .venv/bin/python benchmarks/tokenize_bench.py --mb 100 --workers 2 --out bench_out/tokenize
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Demo/test assets (examples/toydata) are not part of the installed package.
sys.path.insert(0, os.path.join(ROOT, "examples"))


def _write_corpus(path: str, mb: float, seed: int) -> int:
    from toydata.corpus import generate_records

    target, written = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in generate_records(10**9, seed=seed, lexicon_size=500_000):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            if written >= target:
                break
    return written


def prepare(out: str, mb: float, vocab: int) -> dict:
    """Corpus N (seed 1), corpus 2N (N + another N, seed 2), tokenizer trained on seed-0 text."""
    import random

    from toydata.corpus import SyntheticText
    from toydata.tokenizer import train_llama3_style_tokenizer

    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"corpus_{k}.jsonl") for k in ("N", "2N")}
    tok = os.path.join(out, "tokenizer.json")
    if not all(os.path.exists(p) for p in list(paths.values()) + [tok]):
        t = time.time()
        _write_corpus(paths["N"], mb, seed=1)
        _write_corpus(paths["2N"] + ".half", mb, seed=2)
        with open(paths["2N"], "wb") as dst:
            for src in (paths["N"], paths["2N"] + ".half"):
                with open(src, "rb") as f:
                    dst.write(f.read())
        os.remove(paths["2N"] + ".half")
        print(f"corpus generated in {time.time() - t:.0f} s", flush=True)
        t = time.time()
        text = SyntheticText(0, lexicon_size=500_000)
        rng = random.Random(0)
        with open(tok, "w", encoding="utf-8") as f:
            f.write(train_llama3_style_tokenizer(
                (text.document(rng, 3000) for _ in range(3300)), vocab))
        print(f"tokenizer trained in {time.time() - t:.0f} s", flush=True)
    return {"N": paths["N"], "2N": paths["2N"], "tokenizer": tok}


def _child(kind: str, corpus: str, tok: str, prefix: str, workers: int) -> dict:
    """Runs inside a fresh process; returns tokens and seconds of its own measurement."""
    if kind == "hf_batch":
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(tok)
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        start, tokens = time.time(), 0
        for i in range(0, len(texts), 1000):
            tokens += sum(len(e.ids) for e in hf.encode_batch(texts[i:i + 1000], add_special_tokens=False))
        return {"tokens": tokens, "seconds": time.time() - start}
    from megatron_ultralong.data.build.builder import build_dataset
    from megatron_ultralong.data.build.recipe import recipe_from_dict

    start = time.time()
    report = build_dataset(recipe_from_dict({
        "inputs": [corpus], "workers": workers,
        "tokenizer": {"path": tok, "fast_path": "off" if kind == "builder_hf" else "auto",
                      "proof_cache_dir": os.path.join(os.path.dirname(prefix), "proof_cache")},
        "separator": {"text": None, "add_eos": True, "eos_token": "<|end_of_text|>"},
        "output": {"prefix": prefix, "overwrite": True},
    }), progress=False)
    return {"tokens": report["output"]["tokens"], "seconds": time.time() - start,
            "backend": report["tokenizer"]["backend"],
            "tokenize_stage_tokens_per_s": report["timing"]["tokenize_tokens_per_s"],
            "spot_checked": report["tokenizer"].get("spot_checked", 0),
            "spot_mismatches": report["tokenizer"].get("spot_mismatches", 0)}


def run(kind: str, corpus: str, tok: str, prefix: str, workers: int) -> dict:
    """One measurement in a fresh process: wall time, tokens, peak RSS of it and its workers."""
    if kind == "baseline":
        cmd = [sys.executable, os.path.join(HERE, "preprocess_data_baseline.py"), corpus, tok,
               prefix, "--workers", str(workers)]
    else:
        cmd = [sys.executable, __file__, "--child", kind, corpus, tok, prefix, str(workers)]
    load_before = os.getloadavg()[0]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = _TreeRss(proc.pid)
    peak.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    peak.stop = True
    peak.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(kind=kind, wall_s=round(wall, 2), tokens_per_s=result["tokens"] / wall,
                  peak_tree_rss_mb=round(peak.peak_kb / 1024, 1),
                  peak_tree_anon_mb=round(peak.peak_anon_kb / 1024, 1),
                  # Other work on the machine skews every number; the 1-minute load average
                  # before and after each run says how much (2 cores: above ~2 is contention).
                  loadavg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    print(json.dumps(result), flush=True)
    return result


class _TreeRss(threading.Thread):
    """Peak of the summed VmRSS of a process and all its descendants, sampled every 0.1 s
    (ru_maxrss of children is unusable here: a forked helper reports its parent's pages)."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_kb, self.peak_anon_kb, self.stop = root, 0, 0, False

    def run(self) -> None:
        while not self.stop:
            rss, anon = self._sample()
            self.peak_kb, self.peak_anon_kb = max(self.peak_kb, rss), max(self.peak_anon_kb, anon)
            time.sleep(0.1)

    def _sample(self) -> tuple:
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
        tree, frontier = {self.root}, [self.root]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parent.items() if pp == p and c not in tree]
            tree.update(kids)
            frontier += kids
        rss = anon = 0
        for pid in tree:
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                rss += int(fields["VmRSS"].split()[0])
                anon += int(fields["RssAnon"].split()[0])
            except (OSError, KeyError, ValueError):
                continue
        return rss, anon


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, corpus, tok, prefix, workers = sys.argv[2:7]
        result = _child(kind, corpus, tok, prefix, int(workers))
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(main_rss_mb=round(usage / 1024, 1))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size N in MB (2N is also built)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_out", "tokenize"))
    parser.add_argument("--skip-hf-builder", action="store_true")
    args = parser.parse_args()
    files = prepare(args.out, args.mb, args.vocab)
    shutil.rmtree(os.path.join(args.out, "proof_cache"), ignore_errors=True)  # first run: cold
    w, tok, out = args.workers, files["tokenizer"], args.out
    vocab = len(json.load(open(tok, encoding="utf-8"))["model"]["vocab"])
    results = {
        "baseline": run("baseline", files["N"], tok, os.path.join(out, "baseline"), w),
        "hf_batch": run("hf_batch", files["N"], tok, "", w),
        "builder": run("builder", files["N"], tok, os.path.join(out, "builder_N"), w),
        "builder_warm": run("builder", files["N"], tok, os.path.join(out, "builder_N"), w),
    }
    if not args.skip_hf_builder:
        results["builder_hf"] = run("builder_hf", files["N"], tok, os.path.join(out, "builder_hf"), w)
    results["builder_2N"] = run("builder", files["2N"], tok, os.path.join(out, "builder_2N"), w)
    identical = {k: filecmp.cmp(os.path.join(out, "baseline.bin"), os.path.join(out, f"{k}.bin"), shallow=False)
                 and filecmp.cmp(os.path.join(out, "baseline.idx"), os.path.join(out, f"{k}.idx"), shallow=False)
                 for k in ("builder_N", "builder_hf") if os.path.exists(os.path.join(out, f"{k}.bin"))}
    base = results["baseline"]["tokens_per_s"]
    summary = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT)] + [os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
        "corpus_mb": {"N": round(os.path.getsize(files["N"]) / 1e6, 1),
                      "2N": round(os.path.getsize(files["2N"]) / 1e6, 1)},
        "vocab_size": vocab, "workers": w,
        "ratios_vs_baseline": {k: round(r["tokens_per_s"] / base, 2) for k, r in results.items()},
        "identical_bin_idx_to_baseline": identical,
        "results": results,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("corpus_mb", "vocab_size", "ratios_vs_baseline",
                                              "identical_bin_idx_to_baseline")}, indent=2))


if __name__ == "__main__":
    main()
