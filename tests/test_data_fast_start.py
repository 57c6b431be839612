"""What a build does before and beside its workers: the cached proof, forked workers that start
with the main process's backend, the corpus sample checked beside them (and stage 1 run again
with HF when it refutes the fast path), and the histogram drawn in its own process."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl

from megatron_ultralong.data.dataset_info import read_dataset_info, tokenizer_identity
from megatron_ultralong.data.preprocess import fast_path_proof, tokenize_stage
from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.exception_routing import StitchedEncoder
from megatron_ultralong.data.preprocess.length_plot import HistogramPainter
from megatron_ultralong.data.preprocess.stats import LengthStats
from megatron_ultralong.data.preprocess.tiktoken_path import structural_check, read_tokenizer_json, tiktoken_parts

FAST_SWEEP = ((0x0, 0x800),)  # the sweep is not what these tests are about


def _refuse(*args, **kwargs):
    raise AssertionError("called although the proof cache holds the answer")


def test_a_warm_proof_cache_needs_neither_the_json_nor_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", FAST_SWEEP)
    path, cache = tokenizer_path(), str(tmp_path / "cache")
    cold = fast_path_proof.prove_file(path, "special", cache)
    assert cold.ok, cold.reasons
    with monkeypatch.context() as m:
        m.setattr(fast_path_proof, "read_tokenizer_json", _refuse)
        m.setattr(fast_path_proof, "hf_tokenizer", _refuse)
        warm = fast_path_proof.prove_file(path, "special", cache)
    assert warm == cold
    # The parts rebuilt from the cache are the file's own, exceptions and all.
    assert warm.parts == structural_check(read_tokenizer_json(path))[0]
    assert warm.identity == tokenizer_identity(path)
    # The probes of the other special-token mode are proven once, then cached too.
    ordinary = fast_path_proof.prove_file(path, "ordinary", cache)
    with monkeypatch.context() as m:
        m.setattr(fast_path_proof, "hf_tokenizer", _refuse)
        assert fast_path_proof.prove_file(path, "ordinary", cache) == ordinary


def test_a_damaged_cache_file_is_proven_again(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", FAST_SWEEP)
    path, cache = tokenizer_path(), str(tmp_path / "cache")
    first = fast_path_proof.prove_file(path, "special", cache)
    with open(fast_path_proof.cache_file(path, cache), "w", encoding="utf-8") as f:
        f.write('{"reasons": null, "parts": {"tokens": "AAAA", "lengths": [9], "ids": [0]}}')
    assert fast_path_proof.prove_file(path, "special", cache) == first


@pytest.mark.parametrize("llama3_style", [True, False])
def test_parts_give_hf_vocab_size_and_token_ids(llama3_style):
    from tokenizers import Tokenizer

    path = tokenizer_path(llama3_style)
    parts, hf = tiktoken_parts(path), Tokenizer.from_file(path)
    assert parts.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        assert parts.token_id(token) == i, token
    assert parts.token_id("<|no such token|>") is None and parts.token_id("\u4e2d\u6587") is None


def _build(tmp_path, name, corpus, **tokenizer):
    recipe = make_recipe([corpus], str(tmp_path / name), workers=2,
                         tokenizer={"proof_cache_dir": str(tmp_path / "cache"), **tokenizer},
                         separator={"text": None, "add_eos": True, "eos_token": "<|end_of_text|>"})
    return build_dataset(recipe, progress=False)


def _ids(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_forked_workers_start_with_the_main_process_backend(tmp_path, monkeypatch):
    """Workers never build a backend of their own (no tokenizer.json parse, no HF load each): given
    a spec that cannot be loaded, forked workers still encode, with the main process's backend."""
    from megatron_ultralong.data.preprocess.readers import RawBatch
    from megatron_ultralong.data.preprocess.tokenizer_backends import BackendSpec, load_backend

    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", FAST_SWEEP)
    proof = fast_path_proof.prove_file(tokenizer_path(), "special", str(tmp_path / "cache"))
    spec = BackendSpec("tiktoken", tokenizer_path(), "special", proof.hf_only_chars, proof.parts.routed,
                       proof.tainted_ids, proof.parts)
    backend = load_backend(spec)
    unloadable = tokenize_stage.WorkerConfig(BackendSpec("hf", str(tmp_path / "missing.json")), "text", None, None)
    texts = [r["text"] for r in corpus_records(40, seed=5)]
    batches = [RawBatch("c.jsonl", 1 + 10 * i, fixed_domain="web",
                        lines=tuple(json.dumps({"text": t}).encode() for t in texts[10 * i:10 * i + 10]))
               for i in range(4)]
    with tokenize_stage.worker_pool(unloadable, 2, backend) as encode:
        got = np.concatenate([b.tokens for b in encode(batches)])
    want = np.concatenate(backend.encode_batch(texts)).astype(np.int32)
    assert np.array_equal(got, want)


def test_a_fast_build_writes_hf_ids_and_its_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", FAST_SWEEP)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), corpus_records(80, seed=5))
    reference = _build(tmp_path, "hf", corpus, fast_path="off")
    report = _build(tmp_path, "fast", corpus)
    assert report["tokenizer"]["backend"] == "tiktoken"
    assert _ids(str(tmp_path / "fast")) == _ids(str(tmp_path / "hf"))
    assert reference["output"]["tokens"] == report["output"]["tokens"]
    timing = report["timing"]
    assert {"setup_s", "proof_s", "corpus_sample_s", "tokenize_s", "routing_s", "write_s"} <= set(timing)
    assert report["tokenizer"]["proof_checks"]["corpus_slices"] > 0
    info = read_dataset_info(str(tmp_path / "fast"))
    assert info.tokenizer == tokenizer_identity(tokenizer_path())


def test_a_corpus_sample_that_refutes_the_fast_path_reruns_stage_1_with_hf(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", FAST_SWEEP)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), corpus_records(60, seed=9))
    _build(tmp_path, "hf", corpus, fast_path="off")
    _build(tmp_path, "warm", corpus)  # the file's proof (structure, sweep, probes) is now cached
    # A fast path that the cached file proof cannot catch: wrong on real text only. The forked
    # workers inherit the fault, so the first stage 1 writes wrong ids into the pool.
    original = StitchedEncoder.tiktoken_ids

    def reversed_ids(self, text):
        ids = original(self, text)
        return ids[::-1].copy() if len(ids) > 40 else ids

    monkeypatch.setattr(StitchedEncoder, "tiktoken_ids", reversed_ids)
    report = _build(tmp_path, "fast", corpus)
    assert report["tokenizer"]["backend"] == "hf"
    assert report["tokenizer"]["fast_path_reasons"][0].startswith("ids differ on a corpus document")
    assert _ids(str(tmp_path / "fast")) == _ids(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="fast_path='require'.*corpus document"):
        _build(tmp_path, "required", corpus, fast_path="require")
    assert not any(n.startswith("required") for n in os.listdir(tmp_path))


def _stats():
    s = LengthStats(["web"], np.array([4096, 8192]))
    s.add(np.zeros(3, np.int64), np.array([100, 5000, 90000]))
    return s


def test_the_histogram_painter_writes_the_png_and_names_the_file_on_error(tmp_path):
    with HistogramPainter() as painter:
        assert painter.proc is not None and painter.proc.is_alive()
        painter.paint(_stats(), _stats(), str(tmp_path / "h.png"), "t", (4096, 8192))
        proc = painter.proc
    assert not proc.is_alive()
    with open(tmp_path / "h.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    missing = str(tmp_path / "no" / "such" / "dir" / "h.png")
    with HistogramPainter() as painter, pytest.raises(RuntimeError, match="no/such/dir/h.png"):
        painter.paint(_stats(), _stats(), missing, "t")
