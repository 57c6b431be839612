"""Packed SFT rows: schema, exact assistant-only loss mask, packing, order, limits and bad input."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sft_helpers import conversation, hf_tokenizer, write_jsonl, write_tokenizer
from test_sft_chat import _tagged

from megatron_ultralong.data.samples.config import DataSection
from megatron_ultralong.data.samples.sft import SFTDataConfig, SFTDataset, build_sft_dataset, pack_greedy

S = 256
BOS, PAD = 0, 2  # ids of <|begin_of_text|> and <|finetune_right_pad_id|> in sft_helpers' tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    convs = [conversation(k, turns=1 + k % 3, system=k % 2 == 0) for k in range(40)]
    return {
        "tok": write_tokenizer(str(d)),
        "a": write_jsonl(str(d / "a.jsonl"), convs[:25]),
        "b": write_jsonl(str(d / "b.jsonl"), convs[25:]),
        "convs": convs,
        "dir": d,
    }


def _ds(corpus, seed: int = 1234, pack: bool = True, **kw) -> SFTDataset:
    """The SFT dataset of the training config's data section (kw: DataSection fields)."""
    kw.setdefault("paths", (corpus["a"], corpus["b"]))
    kw.setdefault("seq_length", S)
    kw.setdefault("pad_token_id", PAD)
    kw.setdefault("reset_position_ids", True)
    return SFTDataset(DataSection(kind="sft", tokenizer=corpus["tok"], **kw), seed, SFTDataConfig(pack=pack))


def _docs(row):
    """(start, end) of each non-padding document of a row, from document_ids."""
    ids = row["document_ids"].numpy()
    bounds = np.flatnonzero(np.diff(ids)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, len(ids)]
    return list(zip(starts.tolist(), ends.tolist()))


def test_schema_and_shift(corpus):
    ds = _ds(corpus)
    assert len(ds) == ds.stats.rows > 0
    for i in range(len(ds)):
        row = ds[i]
        assert set(row) == {"tokens", "labels", "loss_mask", "position_ids", "document_ids"}
        for key, dtype in [("tokens", torch.int64), ("labels", torch.int64), ("loss_mask", torch.float32),
                           ("position_ids", torch.int64), ("document_ids", torch.int64)]:
            assert row[key].dtype == dtype and row[key].shape == (S,)
        assert torch.equal(row["labels"][:-1], row["tokens"][1:])
        assert row["loss_mask"][-1] == 0


def test_loss_mask_is_exactly_the_assistant_replies(corpus):
    """Expected mask from transformers (generation-tagged Meta template), placed at each packed
    conversation's offset and shifted to next-token form; must equal the row's mask everywhere."""
    hf = hf_tokenizer("llama3.1_chat_template.jinja")
    tagged = _tagged(hf.chat_template)
    expected = {}
    for messages in corpus["convs"]:
        out = hf.apply_chat_template(messages, chat_template=tagged, return_dict=True, return_assistant_tokens_mask=True)
        expected[tuple(out["input_ids"])] = np.asarray(out["assistant_masks"], dtype=np.float32)
    ds = _ds(corpus)
    seen = 0
    for i in range(len(ds)):
        row = ds[i]
        tokens, want = row["tokens"].numpy(), np.zeros(S, dtype=np.float32)
        docs = _docs(row)
        for k, (start, end) in enumerate(docs):
            key = tuple(tokens[start:end].tolist())
            if key not in expected:  # only the trailing padding document may be unknown
                assert k == len(docs) - 1 and (tokens[start:end] == PAD).all()
                continue
            seen += 1
            want[start : end - 1] = expected[key][1:]  # position j predicts token j+1
        assert np.array_equal(row["loss_mask"].numpy(), want), f"row {i}"
        # A target never crosses a conversation boundary.
        m = row["loss_mask"].numpy().astype(bool)[:-1]
        assert (row["document_ids"][:-1][m] == row["document_ids"][1:][m]).all()
    assert seen == len(corpus["convs"])  # every conversation exactly once
    assert ds.stats.loss_tokens == int(sum(ds[i]["loss_mask"].sum() for i in range(len(ds))))


def test_document_and_position_ids(corpus):
    ds = _ds(corpus)
    flat = _ds(corpus, reset_position_ids=False)
    packed_more_than_one = False
    for i in range(len(ds)):
        row = ds[i]
        ids = row["document_ids"].tolist()
        assert ids[0] == 0 and all(b - a in (0, 1) for a, b in zip(ids, ids[1:]))
        n_conv = int((row["tokens"] == BOS).sum())  # each conversation starts with <|begin_of_text|>
        assert [row["tokens"][s] == BOS for s, _ in _docs(row)][:n_conv] == [True] * n_conv
        packed_more_than_one |= n_conv > 1
        if row["tokens"][-1] == PAD:  # padded row: the padding is document n_conv
            assert ids[-1] == n_conv and (row["tokens"][row["document_ids"] == n_conv] == PAD).all()
        else:
            assert ids[-1] == n_conv - 1
        for s, e in _docs(row):
            assert row["position_ids"][s:e].tolist() == list(range(e - s))
        assert flat[i]["position_ids"].tolist() == list(range(S))
    assert packed_more_than_one


def test_packing_fills_rows_and_is_deterministic(corpus):
    a, b, c = _ds(corpus, seed=7), _ds(corpus, seed=7), _ds(corpus, seed=8)
    unpacked = _ds(corpus, pack=False, seed=7)
    assert len(unpacked) == 40 and len(a) < 40
    assert a.stats.tokens == unpacked.stats.tokens and a.stats.fill > unpacked.stats.fill
    rows = lambda ds: [ds[i]["tokens"].tolist() for i in range(len(ds))]  # noqa: E731
    assert rows(a) == rows(b)
    assert rows(a) != rows(c)


def test_pack_greedy():
    assert pack_greedy([5, 5, 3, 7, 2], capacity=10, window=1) == [[0, 1], [2, 3], [4]]
    assert pack_greedy([5, 5, 3, 7, 2], capacity=10, window=4) == [[0, 1], [2, 3], [4]]
    assert pack_greedy([6, 6, 4, 4], capacity=10, window=1) == [[0], [1, 2], [3]]
    assert pack_greedy([6, 6, 4, 4], capacity=10, window=2) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="capacity"):
        pack_greedy([11], capacity=10)


def test_overlong_truncate_drop_error(corpus, tmp_path):
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fox " * 400}]
    late = [{"role": "user", "content": "more " * 400}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(str(tmp_path / "long.jsonl"), [conversation(1), long, late])
    t = _ds(corpus, paths=(path,))
    assert (t.stats.conversations, t.stats.truncated, t.stats.dropped_no_target, len(t)) == (3, 2, 1, 2)
    cut = max((t[i] for i in range(len(t))), key=lambda r: int(r["loss_mask"].sum()))
    assert cut["document_ids"].max() == 0 and cut["loss_mask"][: S - 1].sum() > 0
    d = _ds(corpus, paths=(path,), overlong="drop")
    assert (d.stats.dropped_overlong, d.stats.truncated, len(d)) == (2, 0, 1)
    with pytest.raises(ValueError, match=r"long.jsonl:2: \d+ tokens > seq_length=256"):
        _ds(corpus, paths=(path,), overlong="error")


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"messages": [', "malformed JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "has no 'content'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ],
)
def test_bad_input_names_file_and_line(corpus, tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": conversation(0)})
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{needle}"):
        _ds(corpus, paths=(str(path),))


def test_config_errors(corpus):
    with pytest.raises(ValueError, match="data.overlong='keep'"):
        _ds(corpus, overlong="keep")
    with pytest.raises(ValueError, match="chat_format"):
        _ds(corpus, chat_format="chatml")
    with pytest.raises(ValueError, match="pack_window"):
        SFTDataConfig(pack_window=0)
    assert not {f.name for f in dataclasses.fields(SFTDataConfig)} & {f.name for f in dataclasses.fields(DataSection)}
    with pytest.raises(ValueError, match="does not exist"):
        _ds(corpus, paths=(str(corpus["dir"] / "missing.jsonl"),))


def test_build_from_train_config(corpus):
    from megatron_ultralong.training.config import load_train_config

    cfg = load_train_config(None, (
        "data.kind=sft", f"data.paths=[{corpus['a']}]", f"data.tokenizer={corpus['tok']}",
        f"data.seq_length={S}", "data.pad_token_id=2", "data.reset_position_ids=true", "data.eod_token_id=5",
    ))
    ds = build_sft_dataset(cfg.data, seed=cfg.train.seed)
    assert ds.data.pad_token_id == 2 and ds.seed == 1234 and ds.stats.conversations == 25
    assert any(ds[i]["tokens"][-1] == 2 for i in range(len(ds)))  # padded with data.pad_token_id
    with pytest.raises(ValueError, match="weights"):
        build_sft_dataset(load_train_config(None, ("data.kind=sft", "data.paths=[a, b]", "data.weights=[1, 2]")).data, 1)
