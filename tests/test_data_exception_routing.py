"""Merge exceptions are routed to HF per pre-token span, not per document, and the ids stay HF's.

The tokenizer is made the way Llama-3's was (a BPE's ranks with a second BPE's new tokens appended,
converted by transformers' TikTokenConverter, ignore_merges false), which gives real exceptions:
appended entries that the merges do not rebuild."""
from __future__ import annotations

import functools
import json
import os
import random

import numpy as np
import pytest
from data_helpers import _TMP, corpus_records

from megatron_ultralong.data.preprocess import fast_path_proof
from megatron_ultralong.data.preprocess.exception_routing import _CUT, proven_cuts
from megatron_ultralong.data.preprocess.fast_path_proof import prove_equivalence
from megatron_ultralong.data.preprocess.tokenizer_backends import BackendSpec, HFTokenizerBackend, TiktokenTokenizerBackend
from toydata.corpus import SyntheticText
from toydata.tokenizer import llama3_with_appended_tokens


@functools.lru_cache(maxsize=None)
def _tokenizer() -> str:
    base = [r["text"] for r in corpus_records(200, seed=11)]
    other, rng = SyntheticText(77, lexicon_size=3000), random.Random(77)
    extra = [other.document(rng, 2000) for _ in range(60)]
    text, appended = llama3_with_appended_tokens(base, extra, 3000, 1500, ignore_merges=False)
    assert appended > 100
    path = os.path.join(_TMP, "llama3_appended_im0.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def proof(monkeypatch):
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", ((0x0, 0x3100),))  # keep CI fast
    p = prove_equivalence(_tokenizer(), "special", [r["text"] for r in corpus_records(20, seed=3)])
    assert p.ok, p.reasons
    assert len(p.hf_only_strings) > 10  # real exceptions, found from the vocabulary and merges
    return p


def _backend(proof, routed=True) -> TiktokenTokenizerBackend:
    return TiktokenTokenizerBackend(BackendSpec(
        "tiktoken", _tokenizer(), "special", proof.hf_only_chars,
        proof.hf_only_strings if routed else (), proof.tainted_ids if routed else ()))


def _exception_words(proof) -> list:
    words = []
    for raw in proof.hf_only_strings:
        try:
            words.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return words


def _dense_texts(proof, n: int = 120, seed: int = 0) -> list:
    """Documents dense with exception strings: alone, at pre-token boundaries (glued to
    punctuation, digits, newlines, specials, CJK, emoji, each other), at the start and end."""
    words = _exception_words(proof)
    rng = random.Random(seed)
    glue = ["", " ", "  ", "\n", "\n\n", ",", ".", "'s", "123", "中文", "😀", "é", "\t",
            "<|eot_id|>", " the", "-", "’", "\r\n"]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 40)):
            parts += [rng.choice(words), rng.choice(glue)]
        texts.append("".join(parts))
    texts += [w for w in words[:200]] + [w.strip() + w for w in words[:50]]
    return texts


def test_dense_exception_documents_equal_hf_without_whole_document_routing(proof):
    texts = _dense_texts(proof)
    fast, hf = _backend(proof), HFTokenizerBackend(_tokenizer(), "special")
    for text, got, want in zip(texts, fast.encode_batch(texts), hf.encode_batch(texts)):
        assert np.array_equal(got, want), text[:80]
    counters = fast.counters
    assert counters["routed_to_hf"] == 0 and counters["whole_texts_to_hf"] == 0
    assert counters["hf_spans"] > len(texts)
    # What the routing guards: tiktoken alone differs on these documents.
    bare = _backend(proof, routed=False)
    differ = sum(not np.array_equal(g, w) for g, w in zip(bare.encode_batch(texts), hf.encode_batch(texts)))
    assert differ > len(texts) // 4


def _sent_to_hf(proof, text):
    """(ids, the texts the backend gave HF) for one document, from a fresh backend (no cache)."""
    fast, sent = _backend(proof), []
    real = fast.stitched.hf_encode_batch
    fast.stitched.hf_encode_batch = lambda texts: sent.extend(texts) or real(texts)
    ids = fast.encode_batch([text])[0]
    assert fast.routed_docs == 0  # never the whole document
    return ids, sent


def test_a_long_document_with_one_exception_sends_only_that_word_to_hf(proof):
    word = next(w for w in _exception_words(proof) if w.startswith(" ") and w[1:].isalpha())
    body = " ".join(r["text"] for r in corpus_records(40, seed=5)).replace(word, " ")
    text = body[: len(body) // 2] + word + " and" + body[len(body) // 2:]
    assert len(text) > 50_000
    ids, sent = _sent_to_hf(proof, text)
    assert np.array_equal(ids, HFTokenizerBackend(_tokenizer(), "special").encode_batch([text])[0])
    _, sent_body = _sent_to_hf(proof, body)  # the filler's own exceptions, if any
    assert word in sent and sum(map(len, sent)) - sum(map(len, sent_body)) <= 2 * len(word) + 8


def test_proven_cuts_match_the_readable_pattern():
    rng = random.Random(3)
    alphabet = "ab Z9 \n\n.,é中😀\t'"
    for _ in range(300):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))).encode()
        assert proven_cuts(raw).tolist() == [m.start() for m in _CUT.finditer(raw)], raw


def test_high_plane_code_point_sends_the_document_whole_to_hf(proof):
    text = "plain words \U000F0001 private use" + _exception_words(proof)[0]
    fast = _backend(proof)
    got = fast.encode_batch([text, "only plain words"])
    hf = HFTokenizerBackend(_tokenizer(), "special").encode_batch([text, "only plain words"])
    assert all(np.array_equal(g, w) for g, w in zip(got, hf))
    assert fast.routed_docs == 1 and fast.counters["whole_texts_to_hf"] == 1
    # Plane 14 is swept (its UTF-8 lead byte F3 is shared with unswept planes 12, 13, 15).
    tag = ["flag tag \U000E0041\U000E007F here", "private \U000F0041 plane 15"]
    got = fast.encode_batch(tag)
    hf = HFTokenizerBackend(_tokenizer(), "special").encode_batch(tag)
    assert all(np.array_equal(g, w) for g, w in zip(got, hf))
    assert fast.routed_docs == 2


def test_builder_report_counts_spans(proof, tmp_path):
    from data_helpers import make_recipe, write_jsonl

    from megatron_ultralong.data.preprocess.builder import build_dataset

    texts = _dense_texts(proof, n=30, seed=4)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), [{"text": t, "domain": "web"} for t in texts if t.strip()])
    recipe = make_recipe([corpus], str(tmp_path / "ds"), tokenizer={
        "path": _tokenizer(), "special_tokens_in_text": "special", "fast_path": "require",
        "proof_cache_dir": None}, separator={"text": None})
    report = build_dataset(recipe, progress=False)
    tok = report["tokenizer"]
    assert tok["backend"] == "tiktoken" and tok["routed_to_hf"] == 0 and tok["hf_spans"] > 0
    assert {"setup_s", "proof_s", "tokenize_s", "routing_s", "write_s"} <= set(report["timing"])
    with open(corpus, encoding="utf-8") as f:
        want = HFTokenizerBackend(_tokenizer(), "special").encode_batch(
            [json.loads(line)["text"] for line in f])
    from megatron_ultralong.data.preprocess.indexed import read_index

    lengths, _ = read_index(str(tmp_path / "ds.idx"))
    tokens = np.fromfile(str(tmp_path / "ds.bin"), dtype=np.int32 if report["output"]["dtype"] == "int32" else np.uint16)
    assert tokens.tolist() == [int(i) for ids in want for i in ids] and len(lengths) == len(want)
