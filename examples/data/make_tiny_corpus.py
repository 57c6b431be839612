"""Regenerate the demo corpus and toy tokenizer shipped beside this script (deterministic).

    .venv/bin/python examples/data/make_tiny_corpus.py

tiny_corpus.jsonl: synthetic text (generated, not copied from anywhere) in three domains with
log-normal lengths, a few documents above UltraLong's 8K-token "long" threshold.
toy_tokenizer.json: a 1,000-token byte-level BPE of Llama-3's kind (its split regex, its special
tokens, tokenizer.json laid out as Llama-3's), trained on that corpus. Replace it with
Llama-3.1-8B-Instruct's tokenizer.json for real data.
"""
import os
import sys

# The demo/test assets live beside this folder (examples/toydata), outside the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toydata.corpus import DomainShape, generate_records, write_jsonl
from toydata.tokenizer import train_llama3_style_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAINS = (
    DomainShape("web", median_words=120, sigma=1.0, weight=6.0),
    DomainShape("code", median_words=250, sigma=1.2, weight=2.0),
    DomainShape("books", median_words=1200, sigma=1.0, weight=1.0),
)

if __name__ == "__main__":
    records = list(generate_records(100, seed=2024, domains=DOMAINS))
    size = write_jsonl(os.path.join(HERE, "tiny_corpus.jsonl"), iter(records))
    with open(os.path.join(HERE, "toy_tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(train_llama3_style_tokenizer([r["text"] for r in records], vocab_size=1000))
    print(f"tiny_corpus.jsonl: {len(records)} documents, {size:,} bytes; toy_tokenizer.json written")
