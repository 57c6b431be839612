"""End-to-end dataset builds: token round trip, megatron-core read-back, determinism, readers,
separators, SentencePiece, atomic outputs. References are independent: HF `tokenizers` /
SentencePiece for ids, megatron-core's IndexedDataset / GPTDataset for the files."""
from __future__ import annotations

import filecmp
import gzip
import json
import os

import numpy as np
import pytest
from data_helpers import (
    corpus_records,
    make_recipe,
    megatron_tokenizer_stub,
    sentencepiece_path,
    tokenizer_path,
    write_jsonl,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from megatron_ultralong.data.preprocess import indexed as indexed_mod
from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.readers import BadInputError

SEP = "<s>"


def _hf() -> Tokenizer:
    tok = Tokenizer.from_file(tokenizer_path())
    tok.encode_special_tokens = True
    return tok


def _all_tokens(prefix: str) -> np.ndarray:
    ds = IndexedDataset(prefix)
    return np.concatenate([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros(0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    return write_jsonl(str(path), corpus_records(300, seed=3))


def test_tokens_decode_to_separator_joined_documents(tmp_path, corpus):
    report = build_dataset(make_recipe([corpus], str(tmp_path / "ds")), progress=False)
    texts = [r["text"] for r in corpus_records(300, seed=3)]
    tokens = _all_tokens(str(tmp_path / "ds"))
    assert _hf().decode(tokens.tolist(), skip_special_tokens=False) == "".join(SEP + t for t in texts)
    # One .idx document per source document, each = separator ids + HF ids of the text.
    ds = IndexedDataset(str(tmp_path / "ds"))
    sep = _hf().encode(SEP, add_special_tokens=False).ids
    assert len(ds) == len(texts) == report["output"]["documents"]
    for i in (0, 7, len(texts) - 1):
        assert ds[i].tolist() == sep + _hf().encode(texts[i], add_special_tokens=False).ids
    assert report["tokenizer"]["backend"] == "tiktoken"
    assert report["separators"]["tokens_inserted"] == len(texts) * len(sep)
    for suffix in (".stats.json", ".stats.md", ".lengths.png"):
        assert os.path.getsize(str(tmp_path / "ds") + suffix) > 0


def test_suffix_special_separator_with_bos(tmp_path, corpus):
    recipe = make_recipe([corpus], str(tmp_path / "ds"), separator={
        "text": None, "tokens": ["<|end_of_text|>"], "position": "suffix", "add_bos": True})
    build_dataset(recipe, progress=False)
    texts = [r["text"] for r in corpus_records(300, seed=3)]
    decoded = _hf().decode(_all_tokens(str(tmp_path / "ds")).tolist(), skip_special_tokens=False)
    assert decoded == "".join(f"<|begin_of_text|>{t}<|end_of_text|>" for t in texts)


def test_gpt_dataset_samples_through_blended_builder(tmp_path, corpus):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = str(tmp_path / "ds")
    build_dataset(make_recipe([corpus], prefix), progress=False)
    hf = _hf()
    seq_len = 16384  # longer than most documents: every sample spans several
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=seq_len, blend=([prefix], None), split="1,0,0",
        path_to_cache=str(tmp_path / "cache"), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        tokenizer=megatron_tokenizer_stub(hf.get_vocab_size(), hf.token_to_id("<|end_of_text|>")),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [6, None, None], lambda: True, config).build()
    texts = set(r["text"] for r in corpus_records(300, seed=3))
    whole_docs = 0
    for i in range(len(train)):
        sample = train[i]
        assert sample["tokens"].shape == (seq_len,) and "attention_mask" not in sample
        full = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
        pieces = hf.decode(full.tolist(), skip_special_tokens=False).split(SEP)
        # Between two separators lies exactly one whole source document (the sample's ends are
        # cut mid-document, possibly mid-character, so only inner pieces are compared).
        assert all(p in texts for p in pieces[1:-1])
        whole_docs += len(pieces) - 2
    assert len(train) >= 6 and whole_docs >= 6


def test_same_seed_same_bytes_any_worker_count(tmp_path, corpus):
    up = {"short_keep_prob": 0.5, "long_factor": 2.0, "total_tokens": 300_000, "seed": 5}
    a = build_dataset(make_recipe([corpus], str(tmp_path / "a"), upsampling=up), progress=False)
    b = build_dataset(make_recipe([corpus], str(tmp_path / "b"), upsampling=up, workers=2), progress=False)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(str(tmp_path / "a") + suffix, str(tmp_path / "b") + suffix, shallow=False)
    assert a["output"]["tokens"] == b["output"]["tokens"]
    c = build_dataset(make_recipe([corpus], str(tmp_path / "c"), upsampling={**up, "seed": 6}),
                      progress=False)
    assert not filecmp.cmp(str(tmp_path / "a.bin"), str(tmp_path / "c.bin"), shallow=False)
    assert c["plan"] == a["plan"]  # the seed changes the draws, not the plan


def test_compressed_parquet_and_fixed_domain_inputs_give_identical_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records = corpus_records(60, seed=4)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": [r["text"] for r in records],
                             "domain": [r["domain"] for r in records]}), tmp_path / "c.parquet")
    outputs = []
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        prefix = str(tmp_path / name.replace(".", "_"))
        build_dataset(make_recipe([str(tmp_path / name)], prefix), progress=False)
        outputs.append(prefix)
    for other in outputs[1:]:
        assert filecmp.cmp(outputs[0] + ".bin", other + ".bin", shallow=False)
    # A Parquet file without a domain column takes its domain from the recipe's input entry.
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), tmp_path / "nodom.parquet")
    report = build_dataset(make_recipe([{"path": str(tmp_path / "nodom.parquet"), "domain": "books"}],
                                       str(tmp_path / "nodom")), progress=False)
    assert set(report["source"]) == {"books", "_all"}
    assert report["source"]["books"]["docs"] == len(records)


def test_sentencepiece_backend_with_bos_eos(tmp_path):
    import sentencepiece as spm

    records = corpus_records(40, seed=5)
    path = write_jsonl(str(tmp_path / "c.jsonl"), records)
    recipe = make_recipe([path], str(tmp_path / "sp"),
                         tokenizer={"path": sentencepiece_path(), "kind": "sentencepiece"},
                         separator={"text": None, "add_bos": True, "add_eos": True,
                                    "bos_token": "<s>", "eos_token": "</s>"})
    report = build_dataset(recipe, progress=False)
    sp = spm.SentencePieceProcessor(model_file=sentencepiece_path())
    ds = IndexedDataset(str(tmp_path / "sp"))
    assert report["tokenizer"]["backend"] == "sentencepiece" and ds.index.dtype == np.uint16
    for i, r in enumerate(records):
        assert ds[i].tolist() == [1] + sp.encode(r["text"]) + [2]


def test_failed_build_leaves_no_finished_looking_files(tmp_path, corpus):
    prefix = str(tmp_path / "ds")
    build_dataset(make_recipe([corpus], prefix), progress=False)
    old = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), corpus_records(20, seed=9) + [{"domain": "web"}])
    # Without overwrite an existing dataset is never touched.
    with pytest.raises(FileExistsError, match="output.overwrite"):
        build_dataset(make_recipe([bad], prefix), progress=False)
    # A failing rebuild over it leaves the old dataset intact and no temporary files.
    with pytest.raises(BadInputError):
        build_dataset(make_recipe([bad], prefix, output={"overwrite": True}), progress=False)
    assert {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")} == old
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["bad.jsonl"] + ["ds" + s for s in (".bin", ".idx", ".stats.json", ".stats.md", ".lengths.png", ".dataset.json")])
    # A fresh prefix that fails produces nothing at all.
    with pytest.raises(BadInputError):
        build_dataset(make_recipe([bad], str(tmp_path / "new")), progress=False)
    assert not any(name.startswith(("new", ".new")) for name in os.listdir(tmp_path))


def test_interrupted_commit_never_pairs_old_index_with_new_data(tmp_path, corpus, monkeypatch):
    prefix = str(tmp_path / "ds")
    build_dataset(make_recipe([corpus], prefix), progress=False)
    real_replace = os.replace

    def crash_on_idx(src, dst):
        if dst.endswith(".idx"):
            raise KeyboardInterrupt("simulated kill before the .idx rename")
        real_replace(src, dst)

    monkeypatch.setattr(indexed_mod.os, "replace", crash_on_idx)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(make_recipe([corpus], prefix, output={"overwrite": True},
                                  upsampling={"seed": 9, "short_keep_prob": 0.5}), progress=False)
    assert not IndexedDataset.exists(prefix)  # the old .idx was removed before the new .bin landed
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_index_writer_matches_megatron_core_byte_for_byte(tmp_path):
    """The builder's own .bin/.idx writer (it avoids importing megatron.core: ~10 s of CPU per
    build) gives exactly megatron-core's IndexedDatasetBuilder bytes, for both token dtypes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_ultralong.data.preprocess.indexed import CompactIndexedDatasetBuilder, read_index

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n) for n in (5, 1, 300, 17, 0, 2)]
    for dtype in (np.uint16, np.int32):
        ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
        for d in docs:
            ref.add_document(d, [len(d)])
        ref.finalize(str(tmp_path / "ref.idx"))
        ours = CompactIndexedDatasetBuilder(str(tmp_path / "ours.bin"), dtype)
        ours.add_documents(np.concatenate(docs[:3]), np.array([len(d) for d in docs[:3]]))
        for d in docs[3:]:
            ours.add_document_parts((d[:1], d[1:]))
        ours.finalize(str(tmp_path / "ours.idx"))
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
        ds = IndexedDataset(str(tmp_path / "ours"))
        lengths, pointers = read_index(str(tmp_path / "ours.idx"))
        assert np.array_equal(lengths, ds.sequence_lengths)
        assert np.array_equal(pointers, ds.index.sequence_pointers)


def test_a_build_imports_neither_torch_nor_pyplot(tmp_path, corpus):
    """The builder's fixed start-up cost: a build (CLI, status lines logged, report and PNG written)
    must not import torch (2 s: the rank-aware log filter used to) or matplotlib.pyplot (0.7 s)."""
    import subprocess
    import sys

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"inputs": [corpus], "workers": 0,
                                  "tokenizer": {"path": tokenizer_path(), "fast_path": "off"},
                                  "output": {"prefix": str(tmp_path / "ds")}}))
    probe = ("import sys\n"
             "from megatron_ultralong.data.preprocess.cli import main\n"
             "assert main(['--config', sys.argv[1]]) == 0\n"  # not a terminal: status lines logged
             "print('loaded', sorted(m for m in sys.modules if m in ('torch', 'matplotlib.pyplot')"
             " or m.split('.')[0] == 'megatron'))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=root)).stdout
    assert os.path.exists(tmp_path / "ds.lengths.png") and os.path.exists(tmp_path / "ds.idx")
    assert "loaded []" in out, out[-500:]
