"""PREFIX.dataset.json: the builder records its separator and tokenizer, the trainer reads them.

References are independent of the code under test: HF `tokenizers` for the separator's ids and
megatron-core's IndexedDataset for where each document starts in the .bin."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from megatron_ultralong.data.dataset_info import (
    DocumentBoundary,
    read_dataset_info,
    same_tokenizer,
    tokenizer_identity,
)
from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.samples.config import DataSection
from megatron_ultralong.data.samples.pretrain import add_document_fields, document_boundary
from megatron_ultralong.training.startup_checks import dataset_tokenizer_problem


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    corpus = write_jsonl(str(d / "c.jsonl"), corpus_records(40, seed=5))
    prefix = str(d / "ds")
    build_dataset(make_recipe([corpus], prefix), progress=False)
    return prefix


def test_sidecar_records_the_multi_token_separator_and_tokenizer(built):
    info = read_dataset_info(built)
    hf = Tokenizer.from_file(tokenizer_path())
    sep = hf.encode("<s>", add_special_tokens=False).ids
    assert len(sep) > 1  # "<s>" is several BPE pieces, as in Llama-3
    assert info.separator_text == "<s>" and list(info.separator_ids) == sep and info.separator_position == "prefix"
    assert info.boundary() == DocumentBoundary(tuple(sep), opens=True)
    assert info.tokenizer.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert same_tokenizer(info.tokenizer, tokenizer_identity(tokenizer_path()))
    assert read_dataset_info(built + "_none") is None  # older datasets: no file, no error


def test_document_ids_follow_the_separator_sequence(built):
    """Over the whole .bin, the documents the multi-token separator delimits are exactly the .idx's."""
    ds = IndexedDataset(built)
    docs = [ds[i] for i in range(len(ds))]
    tokens = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    data = DataSection(paths=(built,), reset_position_ids=True, document_mask=True)
    boundary = document_boundary(data)
    sample = add_document_fields({"tokens": tokens}, boundary, reset_positions=True)
    want_doc = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    want_pos = np.concatenate([np.arange(len(d)) for d in docs])
    np.testing.assert_array_equal(sample["document_ids"].numpy(), want_doc)
    np.testing.assert_array_equal(sample["position_ids"].numpy(), want_pos)


def test_closing_single_id_keeps_the_eod_convention():
    """A dataset without the file: data.eod_token_id closes a document (the separator is its last token)."""
    tokens = torch.tensor([5, 6, 0, 7, 0, 8, 9])
    data = DataSection(paths=("nowhere",), eod_token_id=0, reset_position_ids=True)
    sample = add_document_fields({"tokens": tokens}, document_boundary(data), reset_positions=True)
    assert sample["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert sample["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    opening = add_document_fields({"tokens": torch.tensor([1, 2, 5, 1, 2, 6, 1])}, DocumentBoundary((1, 2), True), False)
    assert opening["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1]  # a partial marker at the end starts nothing


def test_boundary_errors_are_named(built, tmp_path):
    with pytest.raises(ValueError, match=r"data.eod_token_id=3 contradicts .*ds.dataset.json"):
        document_boundary(DataSection(paths=(built,), eod_token_id=3))
    with pytest.raises(ValueError, match=r"need document boundaries: .*nowhere.dataset.json does not exist"):
        document_boundary(DataSection(paths=("nowhere",), document_mask=True))
    # a blend whose datasets mark documents differently
    other = tmp_path / "other"
    info = json.load(open(built + ".dataset.json"))
    info["separator"]["ids"] = [1]
    (tmp_path / "other.dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="data.paths mark documents differently"):
        document_boundary(DataSection(paths=(built, str(other))))


def test_trainer_refuses_a_dataset_of_another_tokenizer(built, tmp_path):
    vocab = read_dataset_info(built).tokenizer.vocab_size
    assert dataset_tokenizer_problem([built], vocab, [("data.tokenizer", tokenizer_path())]) is None
    # the same tokenizer re-saved in another layout is the same tokenizer
    resaved = tmp_path / "resaved.json"
    resaved.write_text(json.dumps(json.load(open(tokenizer_path())), indent=4))
    assert dataset_tokenizer_problem([built], vocab, [("data.tokenizer", str(resaved))]) is None
    # another vocabulary: the plain HF-trained BPE of the same texts
    problem = dataset_tokenizer_problem([built], vocab, [("data.tokenizer", tokenizer_path(llama3_style=False))])
    assert problem and "ds.dataset.json: tokenized with" in problem and "which is not data.tokenizer=" in problem
    problem = dataset_tokenizer_problem([built], vocab - 1, [])
    assert problem and f"tokenizer.vocab_size={vocab}" in problem and f"vocabulary of {vocab - 1}" in problem
    assert os.path.isfile(built + ".dataset.json")


def test_dry_run_reads_the_sidecar(built, tmp_path):
    """mu-train --dry-run reports, before a launch, what the trainer would refuse at start-up."""
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.dry_run import dry_run

    vocab = read_dataset_info(built).tokenizer.vocab_size
    assert any(f"tokenizer.vocab_size={vocab}" in e and "vocabulary of 1000" in e for e in dry_run(
        load_train_config(None, ("model.config=tiny", f"data.paths=[{built}]", "data.seq_length=64")), 1).errors)
    model = tmp_path / "config.json"
    model.write_text(json.dumps({"vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "intermediate_size": 128}))
    base = (f"model.config={model}", f"data.paths=[{built}]", "data.seq_length=64")
    assert not dry_run(load_train_config(None, base), 1).errors
    rep = dry_run(load_train_config(None, base + ("data.eod_token_id=3",)), 1)
    assert any("data.eod_token_id=3 contradicts" in e for e in rep.errors)
    rep = dry_run(load_train_config(None, base + (f"data.tokenizer={tokenizer_path(llama3_style=False)}",)), 1)
    assert any("which is not data.tokenizer=" in e for e in rep.errors)
