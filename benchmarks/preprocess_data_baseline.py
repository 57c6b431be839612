"""A re-implementation of Megatron-LM `tools/preprocess_data.py`'s tokenization loop (core_v0.16),
used as the benchmark baseline. It is NOT the original file: preprocess_data.py imports
`megatron.training`, which the megatron-core 0.16 wheel does not ship. What is reproduced is the
method (https://github.com/NVIDIA/Megatron-LM/blob/core_v0.16.0/tools/preprocess_data.py):

- one `multiprocessing.Pool(workers)` (fork, Python's default on Linux) with an initializer that
  builds the tokenizer in each worker;
- `pool.imap(encoder.encode, input_file, 32)` over the raw JSON lines (chunksize 32);
- per line: `json.loads`, then the HuggingFaceTokenizer wrapper's `tokenize(text)`, which is
  `transformers` `tokenizer(text).input_ids`, then `--append-eod` (the tokenizer's eos id);
- `IndexedDatasetBuilder.add_document(ids, [len(ids)])` in the main process, then `finalize`.

    python benchmarks/preprocess_data_baseline.py CORPUS.jsonl tokenizer.json OUT_PREFIX --workers 2
"""
import argparse
import json
import multiprocessing
import time


class Encoder:
    def __init__(self, tokenizer_file: str, eos_token: str):
        self.tokenizer_file = tokenizer_file
        self.eos_token = eos_token

    def initializer(self):
        from transformers import PreTrainedTokenizerFast

        Encoder.tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=self.tokenizer_file, eos_token=self.eos_token)
        Encoder.eod = Encoder.tokenizer.eos_token_id

    def encode(self, json_line):
        data = json.loads(json_line)
        text = data["text"]
        ids = Encoder.tokenizer(text).input_ids
        ids = ids + [Encoder.eod]  # --append-eod
        return ids, [len(ids)], len(json_line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("tokenizer")
    parser.add_argument("output_prefix")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eos-token", default="<|end_of_text|>")
    args = parser.parse_args()

    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = Encoder(args.tokenizer, args.eos_token)
    encoder.initializer()
    vocab_size = len(Encoder.tokenizer)  # as the HuggingFaceTokenizer wrapper reports it
    start = time.time()
    tokens = docs = 0
    with open(args.input, "r", encoding="utf-8") as fin:
        pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = IndexedDatasetBuilder(args.output_prefix + ".bin",
                                        dtype=DType.optimal_dtype(vocab_size))
        for ids, lengths, _ in encoded_docs:
            if len(ids) == 0:
                continue
            builder.add_document(numpy.array(ids), lengths)
            tokens += len(ids)
            docs += 1
        builder.finalize(args.output_prefix + ".idx")
        pool.close()
        pool.join()
    elapsed = time.time() - start
    print(json.dumps({"tokens": tokens, "documents": docs, "seconds": elapsed}))


if __name__ == "__main__":
    main()
