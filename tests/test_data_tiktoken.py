"""The tiktoken fast path gives HF `tokenizers`' ids exactly, and is refused (with HF used
instead) for any tokenizer it cannot prove equivalent."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl

from megatron_ultralong.data.preprocess import fast_path_proof, tiktoken_path
from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.fast_path_proof import PROBE_TEXTS, prove_equivalence
from megatron_ultralong.data.preprocess.tiktoken_path import structural_check
from megatron_ultralong.data.preprocess.tokenizer_backends import BackendSpec, HFTokenizerBackend, TiktokenTokenizerBackend

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
    hf = HFTokenizerBackend(path, mode)
    fast = TiktokenTokenizerBackend(BackendSpec("tiktoken", path, mode, proof.hf_only_chars))
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
    fast = TiktokenTokenizerBackend(BackendSpec("tiktoken", path, "ordinary", hf_only_chars="中"))
    texts = ["plain text", "mixed 中文 text", "more plain"]
    got = fast.encode_batch(texts)
    assert fast.routed_docs == 1
    for g, w in zip(got, HFTokenizerBackend(path).encode_batch(texts)):
        assert np.array_equal(g, w)


@pytest.fixture
def short_sweep(monkeypatch):
    """The full code-point sweep is the first test's job; the merge tests below only need the
    proof's structure, so they sweep planes 0's first 0x3100 code points (still through CJK
    punctuation) to keep CI fast."""
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", ((0x0, 0x3100),))


def _hard_corpus(path: str) -> list:
    """Every vocabulary entry alone (the pre-tokens where ignore_merges matters), glued into
    longer words, plus digits, CJK, emoji, mixed whitespace and long repeated characters."""
    vocab = json.load(open(path, encoding="utf-8"))["model"]["vocab"]
    from megatron_ultralong.data.preprocess.byte_level import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    entries = []
    for tok in vocab:
        try:
            entries.append(bytes(byte_of[c] for c in tok).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    glued = ["".join(entries[i:i + 7]) for i in range(0, len(entries), 7)]
    return entries + glued + HARD_TEXTS + [r["text"] for r in corpus_records(100, seed=5)]


def _assert_fast_equals_hf(path: str, proof, texts: list) -> TiktokenTokenizerBackend:
    hf = HFTokenizerBackend(path)
    fast = TiktokenTokenizerBackend(BackendSpec("tiktoken", path, "ordinary", proof.hf_only_chars,
                                                proof.hf_only_strings))
    for start in range(0, len(texts), 500):
        chunk = texts[start:start + 500]
        for text, g, w in zip(chunk, fast.encode_batch(chunk), hf.encode_batch(chunk)):
            assert np.array_equal(g, w), text[:80]
    return fast


@pytest.mark.parametrize("llama3_style", [True, False], ids=["llama3_style", "hf_trainer"])
def test_fast_path_engages_with_ignore_merges_false(short_sweep, llama3_style):
    path = tokenizer_path(llama3_style=llama3_style, ignore_merges=False)
    assert json.load(open(path, encoding="utf-8"))["model"]["ignore_merges"] is False
    proof = prove_equivalence(path, "ordinary", [r["text"] for r in corpus_records(30, seed=3)])
    assert proof.ok, proof.reasons
    texts = _hard_corpus(path)
    fast = _assert_fast_equals_hf(path, proof, texts)
    assert fast.routed_docs <= len(HARD_TEXTS)  # the fast path did the work, not HF


def _edited_tokenizer(tmp_path, edit) -> str:
    data = json.load(open(tokenizer_path(llama3_style=False, ignore_merges=False), encoding="utf-8"))
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _add_unreachable_entry(data: dict) -> str:
    """A vocabulary entry " kari" (" ka" + "ri", both entries) that no merge makes: HF's BPE
    cannot rebuild it, tiktoken emits it whole and merges " ka"+"ri" into it inside words."""
    vocab = data["model"]["vocab"]
    assert "Ġka" in vocab and "ri" in vocab and "Ġkari" not in vocab
    new_id = 1 + max(list(vocab.values()) + [a["id"] for a in data["added_tokens"]])
    vocab["Ġkari"] = new_id
    return " kari"


def test_entry_not_rebuilt_by_its_merges_is_routed_to_hf(short_sweep, tmp_path):
    path = _edited_tokenizer(tmp_path, _add_unreachable_entry)
    proof = prove_equivalence(path, "ordinary")
    assert proof.ok, proof.reasons
    assert proof.hf_only_strings == (b" kari",)
    texts = [" kari", "a kari b", " karimo sa", "no such word here", " kar i"] + _hard_corpus(path)[:400]
    fast = _assert_fast_equals_hf(path, proof, texts)
    # Per pre-token, not per document: no document went to HF whole, only the " kari..." words.
    assert fast.routed_docs == 0
    assert fast.stitched.counters["hf_spans"] >= 3
    first = TiktokenTokenizerBackend(BackendSpec("tiktoken", path, "ordinary", proof.hf_only_chars,
                                                 proof.hf_only_strings))
    first.encode_batch(texts[:5])
    assert first.stitched.counters["hf_span_bytes"] == len(" kari" * 2 + " karimo")
    # Without the routing tiktoken really differs on those documents (what the test guards).
    unrouted = TiktokenTokenizerBackend(BackendSpec("tiktoken", path, "ordinary", proof.hf_only_chars))
    hf = HFTokenizerBackend(path)
    assert not np.array_equal(unrouted.encode_batch([" kari"])[0], hf.encode_batch([" kari"])[0])
    assert not np.array_equal(unrouted.encode_batch([" karimo"])[0], hf.encode_batch([" karimo"])[0])


def test_late_merge_is_routed_to_hf(short_sweep, tmp_path):
    moved = []

    def move_merge_last(data):
        merges = data["model"]["merges"]
        moved.append(merges[10])
        merges.append(merges.pop(10))

    path = _edited_tokenizer(tmp_path, move_merge_last)
    late = "".join(moved[0])
    proof = prove_equivalence(path, "ordinary")
    assert proof.ok, proof.reasons
    from megatron_ultralong.data.preprocess.byte_level import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    assert bytes(byte_of[c] for c in late) in proof.hf_only_strings
    _assert_fast_equals_hf(path, proof, _hard_corpus(path)[:2000])


def test_genuinely_different_tokenizer_is_refused_and_builder_falls_back(tmp_path):
    plain = _edited_tokenizer(tmp_path, lambda d: d.__setitem__("normalizer", {"type": "NFKC"}))
    proof = prove_equivalence(plain, "ordinary")
    assert not proof.ok and "normalizer" in proof.reasons[0]
    records = corpus_records(30, seed=2)
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), records)
    report = build_dataset(make_recipe([corpus], str(tmp_path / "ds"),
                                       tokenizer={"path": plain}), progress=False)
    assert report["tokenizer"]["backend"] == "hf"
    assert "normalizer" in report["tokenizer"]["fast_path_reasons"][0]
    with pytest.raises(ValueError, match="tokenizer.fast_path='require'"):
        build_dataset(make_recipe([corpus], str(tmp_path / "ds2"),
                                  tokenizer={"path": plain, "fast_path": "require"}), progress=False)
    # The fallback's ids are HF's own.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "ds"))
    hf = HFTokenizerBackend(plain)
    sep = hf.encode_batch(["<s>"])[0].tolist()
    assert ds[5].tolist() == sep + hf.encode_batch([records[5]["text"]])[0].tolist()


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.__setitem__("normalizer", {"type": "NFC"}), "normalizer"),
    (lambda d: d["model"].__setitem__("byte_fallback", True), "byte_fallback"),
    (lambda d: d["model"]["merges"].append(["Ġ", "zzzz"]), "outside the vocab"),
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

    def wrong_regex(d, check_merges=True, parts=None):
        enc = real(d, check_merges, parts)
        return tiktoken.Encoding("wrong", pat_str=tiktoken_path.GPT2_SPLIT_REGEX,
                                 mergeable_ranks=enc._mergeable_ranks, special_tokens=enc._special_tokens)

    monkeypatch.setattr(tiktoken_path, "build_encoding", wrong_regex)
    monkeypatch.setattr(fast_path_proof, "SWEPT_RANGES", ((0x0, 0x800),))  # keep the test fast
    proof = prove_equivalence(str(path), "ordinary")
    assert not proof.ok
