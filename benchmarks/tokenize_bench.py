"""Dataset builder vs the REAL Megatron-LM `tools/preprocess_data.py` (core_v0.16.1) and vs a bare
HF `tokenizers` pool (`benchmarks/hf_pool_baseline.py`: `Tokenizer.encode` per document in a
`multiprocessing.Pool`): tokens/s end to end, same corpus, same number of workers, interleaved,
on four tokenizers:
  a  llama3_im1  Llama-3-style byte-level BPE (TikTokenConverter layout), ignore_merges: true
  b  llama3_im0  the same file with ignore_merges: false
  c  hf_trainer  a plain HF `tokenizers` BpeTrainer BPE (merges in creation order), ignore_merges
                 false (the trainer's default)
  d  cl100k_l3   made as Llama-3's file was (`benchmarks/llama3_like_tokenizer.py`): the real
                 cl100k_base ranks + appended tokens to 128K, converted by transformers'
                 TikTokenConverter, ignore_merges false: thousands of merge exceptions
(a)-(c) are ~100K-token vocabularies trained here on synthetic text; nothing is downloaded.

The corpus mimics long-context data (`examples/toydata/longdocs.py`: ~80% of the bytes in
documents of 20K-300K words; web, wiki, code, arXiv and book-like text). For each tokenizer and
corpus, in this order: preprocess_data.py, the bare pool, the builder (each a fresh process; the
builder's equivalence proof cached by an earlier cold run, which is timed and reported
separately), so all three see the same machine load. Wall time is measured around each process:
start-up, proof, stats, report and renames included. The builder writes separator-free,
EOS-terminated, BOS-free documents, so its .bin/.idx must equal preprocess_data.py's byte for byte
(`--append-eod`) and its .bin the pool's token file; both are checked for every run. The 1-minute
load average is recorded before and after every run (the machine's cores are shared).

    .venv/bin/python benchmarks/tokenize_bench.py --mb 200 --small-mb 20 --workers 2 \
        --megatron-lm ~/src/Megatron-LM-core_v0.16.1 --out bench_out/tokenize
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, HERE)

import preprocess_data_baseline as baseline  # noqa: E402

EOS = "<|end_of_text|>"
TOKENIZERS = ("llama3_im1", "llama3_im0", "hf_trainer", "cl100k_l3")


def _write_corpus(path: str, mb: float, seed: int) -> None:
    from toydata.longdocs import long_context_records

    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for rec in long_context_records(int(mb * 1e6), seed=seed):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def prepare(out: str, mb: float, small_mb: float, vocab: int) -> dict:
    """Corpora (seed 1 and 2) and the three tokenizers (trained on seed-0 text), made once."""
    from toydata.corpus import SyntheticText
    from toydata.tokenizer import train_llama3_style_tokenizer

    os.makedirs(out, exist_ok=True)
    files = {"N": os.path.join(out, f"long_corpus_{mb:g}mb.jsonl"),
             "small": os.path.join(out, f"long_corpus_{small_mb:g}mb.jsonl")}
    for key, size, seed in (("N", mb, 1), ("small", small_mb, 2)):
        if not os.path.exists(files[key]):
            _write_corpus(files[key], size, seed)
    toks = {k: os.path.join(out, f"tokenizer_{k}.json") for k in TOKENIZERS}
    if not os.path.exists(toks["cl100k_l3"]):
        import llama3_like_tokenizer

        print("cl100k_l3:", llama3_like_tokenizer.build(toks["cl100k_l3"]), flush=True)
    if not all(os.path.exists(toks[k]) for k in TOKENIZERS[:3]):
        text = SyntheticText(0, lexicon_size=500_000)

        def docs():
            rng = random.Random(0)
            return (text.document(rng, 3000) for _ in range(3300))

        t = time.time()
        llama3 = json.loads(train_llama3_style_tokenizer(docs(), vocab, ignore_merges=True))
        plain = train_llama3_style_tokenizer(docs(), vocab, llama3_style=False, ignore_merges=False)
        with open(toks["llama3_im1"], "w", encoding="utf-8") as f:
            json.dump(llama3, f, ensure_ascii=False)
        llama3["model"]["ignore_merges"] = False
        with open(toks["llama3_im0"], "w", encoding="utf-8") as f:
            json.dump(llama3, f, ensure_ascii=False)
        with open(toks["hf_trainer"], "w", encoding="utf-8") as f:
            f.write(plain)
        print(f"tokenizers trained in {time.time() - t:.0f} s", flush=True)
    return {"corpus": files, "tokenizers": toks}


def _recipe(out: str, corpus: str, tok: str, prefix: str, fast_path: str) -> str:
    import yaml

    path = prefix + ".recipe.yaml"
    with open(path, "w") as f:
        yaml.safe_dump({
            "inputs": [corpus],
            "tokenizer": {"path": tok, "fast_path": fast_path, "special_tokens_in_text": "special",
                          "proof_cache_dir": os.path.join(out, "proof_cache")},
            "separator": {"text": None, "add_eos": True, "eos_token": EOS},
            "output": {"prefix": prefix, "overwrite": True},
        }, f)
    return path


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _timed(cmd: list, env=None) -> tuple:
    load = _loadavg()
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, [load, _loadavg()], proc.stdout


def _tokens(prefix: str) -> int:
    from megatron_ultralong.data.preprocess.indexed import read_index

    lengths, _ = read_index(prefix + ".idx")
    return int(np.asarray(lengths, dtype=np.int64).sum())


def run_builder(out, corpus, tok, prefix, workers, fast_path="auto") -> dict:
    recipe = _recipe(out, corpus, tok, prefix, fast_path)
    wall, load, _ = _timed([sys.executable, "tools/build_dataset.py", "--config", recipe,
                            "--workers", str(workers), "--no-progress"],
                           env={**os.environ, "PYTHONPATH": ROOT})
    with open(prefix + ".stats.json") as f:
        report = json.load(f)
    tokens = report["output"]["tokens"]
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall),
            "loadavg_1m": load, "backend": report["tokenizer"]["backend"],
            "fast_path_reasons": report["tokenizer"].get("fast_path_reasons"),
            "routed_to_hf": report["tokenizer"].get("routed_to_hf", 0),
            "routed_strings": report["tokenizer"].get("proof_checks", {}).get("routed_strings"),
            "hf_spans": report["tokenizer"].get("hf_spans", 0),
            "hf_span_bytes": report["tokenizer"].get("hf_span_bytes", 0),
            "timing": report["timing"]}


def run_pool(corpus, tok, out_bin, workers) -> dict:
    wall, load, stdout = _timed([sys.executable, os.path.join(HERE, "hf_pool_baseline.py"), corpus,
                                 tok, out_bin, "--workers", str(workers), "--eos", EOS],
                                env={**os.environ, "PYTHONPATH": ROOT})
    tokens = json.loads(stdout.strip().splitlines()[-1])["tokens"]
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall),
            "loadavg_1m": load}


def run_baseline(args, python, script, corpus, tok, prefix) -> dict:
    tok_dir = baseline.tokenizer_dir(tok, EOS, prefix + ".tokenizer")
    wall, load, _ = _timed(baseline.command(python, script, corpus, tok_dir, prefix, args.workers),
                           env=baseline.environment(args.megatron_lm))
    tokens = _tokens(prefix + "_text_document")
    return {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall),
            "loadavg_1m": load}


def _identical(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + s, b + s, shallow=False) for s in (".bin", ".idx"))


def markdown_table(summary: dict) -> str:
    """The docs/benchmarks.md table of a results json: one row per tokenizer and corpus."""
    names = {"llama3_im1": "(a) Llama-3-style, ignore_merges true",
             "llama3_im0": "(b) the same, ignore_merges false", "hf_trainer": "(c) HF-trainer BPE",
             "cl100k_l3": "(d) cl100k + appended, TikTokenConverter, ignore_merges false"}
    mb = summary["corpus_mb"]
    rows = ["| tokenizer | corpus | tokens | preprocess_data.py tok/s | bare pool tok/s | builder tok/s "
            "| **vs preprocess_data** | **vs bare pool** | load 1m (P / pool / B) | output |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]

    def load(r):
        return f"{r['loadavg_1m'][0]:.1f}-{r['loadavg_1m'][1]:.1f}" if r else "-"

    for name, res in summary["results"].items():
        if "cold_small" in res:
            r = res["cold_small"]
            rows.append(f"| {names.get(name, name)} | {mb['small']:g} MB | {r['tokens']:,} | | | "
                        f"{r['tokens_per_s']:,} (proof cold, {r['timing'].get('proof_s', '?')} s) "
                        f"| | | {load(r)} | - |")
        for size in ("small", "N"):
            if f"builder_{size}" not in res:
                continue
            b, p, pp = res[f"builder_{size}"], res[f"pool_{size}"], res.get(f"baseline_{size}")
            same = [res.get(f"identical_{size}"), res.get(f"pool_identical_{size}")]
            vs_pp = f"**{b['tokens_per_s'] / pp['tokens_per_s']:.2f}x**" if pp else "-"
            pp_rate = f"{pp['tokens_per_s']:,}" if pp else "-"
            rows.append(
                f"| {names.get(name, name)} | {mb[size]:g} MB | {b['tokens']:,} | {pp_rate} | "
                f"{p['tokens_per_s']:,} | {b['tokens_per_s']:,} | {vs_pp} | "
                f"**{b['tokens_per_s'] / p['tokens_per_s']:.2f}x** | "
                f"{load(pp)} / {load(p)} / {load(b)} | "
                f"{'DIFFERS' if False in same else 'byte-identical'} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=60.0, help="main corpus size in MB")
    parser.add_argument("--small-mb", type=float, default=20.0, help="small corpus (fixed costs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS))
    parser.add_argument("--megatron-lm", help="Megatron-LM checkout at core_v0.16.1 (required "
                        "unless --no-preprocess-data)")
    parser.add_argument("--python", help="python for preprocess_data.py (default: make a venv)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench_out", "tokenize"))
    parser.add_argument("--sizes", default="small,N", help="which corpora to run (small,N)")
    parser.add_argument("--no-preprocess-data", action="store_true",
                        help="skip the preprocess_data.py baseline (bare pool and builder only)")
    parser.add_argument("--reuse-proof-cache", action="store_true",
                        help="skip the cold run of a tokenizer whose proof is already cached")
    parser.add_argument("--table", metavar="RESULTS_JSON",
                        help="only print the markdown table of an earlier run's results.json")
    if "--table" in sys.argv:  # no checkout needed to render a table
        with open(sys.argv[sys.argv.index("--table") + 1]) as f:
            print(markdown_table(json.load(f)))
        return
    args = parser.parse_args()
    script = python = None
    if not args.no_preprocess_data:
        script = baseline.check_checkout(args.megatron_lm)
        python = args.python or baseline.setup_venv()
    files = prepare(args.out, args.mb, args.small_mb, args.vocab)
    results = {}
    for name in args.tokenizers.split(","):
        tok = files["tokenizers"][name]
        from megatron_ultralong.data.preprocess.fast_path_proof import cache_file

        cache = os.path.join(args.out, "proof_cache")
        cached = cache_file(tok, cache)
        res = {}
        if not (args.reuse_proof_cache and os.path.exists(cached)):
            if os.path.exists(cached):
                os.remove(cached)  # the cold run below pays for the proof
            res["cold_small"] = run_builder(args.out, files["corpus"]["small"], tok,
                                            os.path.join(args.out, f"{name}_cold"), args.workers)
            print(name, "cold", json.dumps(res["cold_small"]), flush=True)
        for size in args.sizes.split(","):
            corpus = files["corpus"][size]
            b_prefix = os.path.join(args.out, f"{name}_{size}_baseline")
            u_prefix = os.path.join(args.out, f"{name}_{size}_builder")
            p_bin = os.path.join(args.out, f"{name}_{size}_pool.bin")
            if not args.no_preprocess_data:
                res[f"baseline_{size}"] = run_baseline(args, python, script, corpus, tok, b_prefix)
            res[f"pool_{size}"] = run_pool(corpus, tok, p_bin, args.workers)
            res[f"builder_{size}"] = run_builder(args.out, corpus, tok, u_prefix, args.workers)
            res[f"pool_identical_{size}"] = filecmp.cmp(p_bin, u_prefix + ".bin", shallow=False)
            res[f"ratio_pool_{size}"] = round(res[f"builder_{size}"]["tokens_per_s"]
                                              / res[f"pool_{size}"]["tokens_per_s"], 2)
            if not args.no_preprocess_data:
                res[f"identical_{size}"] = _identical(b_prefix + "_text_document", u_prefix)
                res[f"ratio_{size}"] = round(res[f"builder_{size}"]["tokens_per_s"]
                                             / res[f"baseline_{size}"]["tokens_per_s"], 2)
            print(name, size, json.dumps({k: res[k] for k in res if k.endswith(size)}), flush=True)
        results[name] = res
    summary = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT)]
                            + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                   f"(shared), Python {platform.python_version()}",
        "corpus_mb": {k: round(os.path.getsize(p) / 1e6, 1) for k, p in files["corpus"].items()},
        "workers": args.workers, "results": results,
    }
    with open(os.path.join(args.out, f"results_{args.sizes.replace(',', '_')}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: {r: v[r] for r in v if r.startswith(("ratio", "identical", "pool_identical"))}
                      for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
