"""The tiktoken fast path gives HF `tokenizers`' ids exactly, and is refused (with HF used
instead) for any tokenizer it cannot prove equivalent."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl

from megatron_ultralong.data.build import tiktoken_path
from megatron_ultralong.data.build.builder import build_dataset
from megatron_ultralong.data.build.tiktoken_path import PROBE_TEXTS, prove_equivalence, structural_check
from megatron_ultralong.data.build.tokenizer_backends import BackendSpec, HFBackend, TiktokenBackend

HARD_TEXTS = list(PROBE_TEXTS) + [
    "<|begin_of_text|><|end_of_text|><|eot_id|>glued<|start_header_id|>user<|end_header_id|>\n\n",
    "partial specials <|begin_of_text <|end_of_text|| |>",
    " " * 10_000 + "x" + "\t \n" * 300,
    "1234567890" * 500 + " 3.14e-10 0x1F -42 ١٢٣ 12,345.67",
    "🧑🏾‍🚀🏳️‍🌈😀" * 50 + "🀄🃏 \U0001FAE8",
    "漢字" * 300 + "。、「」 ﾊﾝｶｸ Ｆｕｌｌｗｉｄｔｈ",
    "x" * 200_000,  # one 200K-character pre-token
    "I'M HE'S 'S 'ſ 'K ǅ",
    "\u0301\u0302 leading combining; \u200d\u200c joiners; \ufffd replacement; \U000E0041 tag",
    "\r\n\r\n\r \r  \n\n\n   ",
]


def _random_texts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    alphabet = "aZ09 \t\n\r'.,;-_<|>" + "éßñçøΩж中文한😀🚀\u0301\u00a0\u3000"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400))) for _ in range(n)]


@pytest.mark.parametrize("mode", ["ordinary", "special"])
def test_fast_path_ids_equal_hf_ids(mode):
    path = tokenizer_path()
    corpus = [r["text"] for r in corpus_records(300, seed=3)]
    proof = prove_equivalence(path, mode, corpus[:50])
    assert proof.ok, proof.reasons
    assert proof.checks["code_points_swept"] > 260_000 and proof.mismatched_code_points == ()
    hf = HFBackend(path, mode)
    fast = TiktokenBackend(BackendSpec("tiktoken", path, mode, proof.hf_only_chars))
    texts = HARD_TEXTS + corpus + _random_texts(300, seed=1)
    got, want = fast.encode_batch(texts), hf.encode_batch(texts)
    for text, g, w in zip(texts, got, want):
        assert np.array_equal(g, w), text[:80]
    assert fast.routed_docs == 0  # every text above was encoded by tiktoken itself
    first_special = hf.token_id("<|begin_of_text|>")
    i = next(k for k, t in enumerate(texts) if "<|begin_of_text|>" in t)
    has_special_ids = bool((got[i] >= first_special).any())
    assert has_special_ids == (mode == "special")  # special strings in text: ids only if "special"


def test_routed_documents_use_hf_and_stay_identical():
    path = tokenizer_path()
    fast = TiktokenBackend(BackendSpec("tiktoken", path, "ordinary", hf_only_chars="中"))
    texts = ["plain text", "mixed 中文 text", "more plain"]
    got = fast.encode_batch(texts)
    assert fast.routed_docs == 1
    for g, w in zip(got, HFBackend(path).encode_batch(texts)):
        assert np.array_equal(g, w)


def test_plain_hf_trained_bpe_is_refused_and_builder_falls_back(tmp_path):
    plain = tokenizer_path(llama3_style=False)
    proof = prove_equivalence(plain, "ordinary")
    assert not proof.ok and "closed under splitting" in proof.reasons[0]
    records = corpus_records(30, seed=2)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), records)
    report = build_dataset(make_recipe([corpus], str(tmp_path / "ds"),
                                       tokenizer={"path": plain}), progress=False)
    assert report["tokenizer"]["backend"] == "hf"
    assert "closed under splitting" in report["tokenizer"]["fast_path_reasons"][0]
    with pytest.raises(ValueError, match="tokenizer.fast_path='require'"):
        build_dataset(make_recipe([corpus], str(tmp_path / "ds2"),
                                  tokenizer={"path": plain, "fast_path": "require"}), progress=False)
    # The fallback's ids are HF's own.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "ds"))
    hf = HFBackend(plain)
    sep = hf.encode_batch(["<s>"])[0].tolist()
    assert ds[5].tolist() == sep + hf.encode_batch([records[5]["text"]])[0].tolist()


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.__setitem__("normalizer", {"type": "NFC"}), "normalizer"),
    (lambda d: d["model"].__setitem__("ignore_merges", False), "ignore_merges"),
    (lambda d: d["model"].__setitem__("merges", d["model"]["merges"][::-1]), "ordered"),
    (lambda d: d["model"].__setitem__("merges", d["model"]["merges"][:-50]), "closed under splitting"),
    (lambda d: d["added_tokens"][0].__setitem__("lstrip", True), "plain special token"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][1].__setitem__("use_regex", True), "ByteLevel"),
    (lambda d: d.__setitem__("pre_tokenizer", {"type": "Metaspace"}), "pre_tokenizer"),
    (lambda d: d["model"].__setitem__("type", "WordPiece"), "not BPE"),
])
def test_structural_check_refuses_what_it_cannot_prove(edit, reason):
    data = json.load(open(tokenizer_path(), encoding="utf-8"))
    assert structural_check(data)[0] is not None
    edit(data)
    parts, reasons = structural_check(data)
    assert parts is None and any(reason in r for r in reasons), reasons


def test_proof_rejects_an_encoding_that_disagrees(monkeypatch, tmp_path):
    import tiktoken

    # Same file contents, new path: no memoised proof. A wrong split regex must be caught.
    path = tmp_path / "tok.json"
    data = json.load(open(tokenizer_path(), encoding="utf-8"))
    data["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": False, "use_regex": False}  # new digest
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    real = tiktoken_path.build_encoding

    def wrong_regex(d):
        enc = real(d)
        return tiktoken.Encoding("wrong", pat_str=tiktoken_path.GPT2_SPLIT_REGEX,
                                 mergeable_ranks=enc._mergeable_ranks, special_tokens=enc._special_tokens)

    monkeypatch.setattr(tiktoken_path, "build_encoding", wrong_regex)
    monkeypatch.setattr(tiktoken_path, "SWEPT_RANGES", ((0x0, 0x800),))  # keep the test fast
    proof = prove_equivalence(str(path), "ordinary")
    assert not proof.ok
