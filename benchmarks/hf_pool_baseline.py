"""The bare HF `tokenizers` pool: the simplest fast way to tokenize a JSONL corpus, as a baseline.

`multiprocessing.Pool(N)`, each worker loading the tokenizer.json once and calling
`Tokenizer.encode(text, add_special_tokens=False)` per document; the parent writes every
document's ids followed by the EOS id as one flat token file (the same tokens, in the same order,
as the builder's separator-free, EOS-terminated .bin, so the two are compared byte for byte). No
validation, no report, no index: only what tokenizing needs.

    python benchmarks/hf_pool_baseline.py CORPUS.jsonl tokenizer.json OUT.bin --workers 2 \
        --eos '<|end_of_text|>'
Prints a JSON line: documents, tokens, wall seconds (start-up included when timed from outside).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

_TOK = {}


def _init(path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker, as the pool intends
    from tokenizers import Tokenizer

    _TOK["t"] = Tokenizer.from_file(path)


def _encode(line: bytes) -> np.ndarray:
    text = json.loads(line)["text"]
    return np.asarray(_TOK["t"].encode(text, add_special_tokens=False).ids, dtype=np.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus")
    parser.add_argument("tokenizer")
    parser.add_argument("out")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eos", default="<|end_of_text|>")
    parser.add_argument("--dtype", default="int32", help="token dtype of OUT (the builder's)")
    args = parser.parse_args(argv)
    start = time.time()
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(args.tokenizer).token_to_id(args.eos)
    docs = tokens = 0
    with open(args.corpus, "rb") as f, open(args.out, "wb") as out, \
            mp.get_context("spawn").Pool(args.workers, _init, (args.tokenizer,)) as pool:
        for ids in pool.imap(_encode, (line for line in f if line.strip()), chunksize=4):
            out.write(np.append(ids, eos).astype(args.dtype).tobytes())
            docs += 1
            tokens += len(ids) + 1
    print(json.dumps({"documents": docs, "tokens": tokens, "seconds": round(time.time() - start, 2)}))


if __name__ == "__main__":
    sys.exit(main())
