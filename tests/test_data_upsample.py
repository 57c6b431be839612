"""Upsampling policy: the plan's arithmetic, the per-document draws, and an end-to-end build whose
realised statistics must match the recipe within a stated statistical tolerance."""
from __future__ import annotations

import numpy as np
import pytest
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from megatron_ultralong.data.preprocess import upsample
from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.recipe import (
    DomainPolicy,
    UpsampleConfig,
    load_recipe,
    recipe_from_dict,
)


def _totals(domain_lengths):
    cfg = UpsampleConfig()
    totals = upsample.ClassTotals.zeros(len(domain_lengths))
    for i, lengths in enumerate(domain_lengths):
        totals.add(np.full(len(lengths), i), np.asarray(lengths), cfg)
    return totals


def test_plan_hits_budget_and_shares_and_keeps_the_length_profile():
    rng = np.random.default_rng(0)
    lengths = [rng.integers(10, 30000, 500), rng.integers(10, 3000, 2000)]
    cfg = UpsampleConfig(total_tokens=2_000_000, short_keep_prob=0.2, long_factor=4.0,
                         domains={"a": DomainPolicy(share=0.7), "b": DomainPolicy(share=0.3)})
    plans = upsample.plan_domains(["a", "b"], _totals(lengths), cfg, extra_per_piece=3)
    assert sum(p.expected_tokens for p in plans) == pytest.approx(2_000_000)
    assert [p.expected_tokens / 2_000_000 for p in plans] == pytest.approx([0.7, 0.3])
    for p in plans:  # one scale per domain: the short:medium:long ratio is the recipe's
        assert np.array(p.weights) / p.scale == pytest.approx([0.2, 1.0, 4.0])


def test_original_shares_and_no_budget():
    lengths = [[100, 5000, 9000], [200, 300]]
    totals = _totals(lengths)
    plans = upsample.plan_domains(["a", "b"], totals, UpsampleConfig(long_factor=2.0), 0)
    assert [p.scale for p in plans] == [1.0, 1.0]  # no budget, no shares: weights as given
    plans = upsample.plan_domains(["a", "b"], totals, UpsampleConfig(total_tokens=10_000), 0)
    assert [p.target_share for p in plans] == pytest.approx([14100 / 14600, 500 / 14600])


def test_copies_have_the_planned_mean_and_are_order_free():
    n = 200_000
    keys = np.random.default_rng(1).integers(0, 2**63, n, dtype=np.uint64)
    lengths = np.where(np.arange(n) % 2 == 0, 100, 20000)  # half short, half long
    weights = np.array([[0.3, 1.0, 2.6]])
    cfg = UpsampleConfig(seed=3)
    copies = upsample.copies_per_document(keys, np.zeros(n, dtype=np.int64), lengths, weights, cfg)
    short, long = copies[0::2], copies[1::2]
    assert set(np.unique(short)) == {0, 1} and set(np.unique(long)) == {2, 3}
    # Bernoulli means; tolerance 5 standard errors.
    for got, w in ((short.mean(), 0.3), (long.mean(), 2.6)):
        f = w - np.floor(w)
        assert abs(got - w) < 5 * np.sqrt(f * (1 - f) / (n / 2))
    perm = np.random.default_rng(2).permutation(n)
    again = upsample.copies_per_document(keys[perm], np.zeros(n, dtype=np.int64), lengths[perm],
                                         weights, cfg)
    assert np.array_equal(again, copies[perm])  # a document's fate does not depend on its position
    other_seed = upsample.copies_per_document(keys, np.zeros(n, dtype=np.int64), lengths, weights,
                                              UpsampleConfig(seed=4))
    assert not np.array_equal(other_seed, copies)


def test_end_to_end_statistics_match_the_recipe(tmp_path):
    records = corpus_records(300, seed=3)
    path = write_jsonl(str(tmp_path / "c.jsonl"), records)
    up = {"total_tokens": 400_000, "short_threshold": 1024, "long_threshold": 4096,
          "short_keep_prob": 0.25, "long_factor": 3.0, "seed": 11,
          "domains": {"web": {"share": 0.5}, "code": {"share": 0.2}, "books": {"share": 0.3}}}
    report = build_dataset(make_recipe([path], str(tmp_path / "ds"), upsampling=up), progress=False)
    # Independent lengths: HF tokenizers on the source texts.
    hf = Tokenizer.from_file(tokenizer_path())
    hf.encode_special_tokens = True
    extra = report["separators"]["affix_tokens_per_document"]
    expected, variance, by_class = {}, {}, {}
    for r in records:
        n = len(hf.encode(r["text"], add_special_tokens=False).ids)
        cls = 0 if n < 1024 else (1 if n < 4096 else 2)
        w = list(report["plan"][r["domain"]]["weights"].values())[cls]
        f = w - np.floor(w)
        expected[r["domain"]] = expected.get(r["domain"], 0) + w * (n + extra)
        variance[r["domain"]] = variance.get(r["domain"], 0) + f * (1 - f) * (n + extra) ** 2
        key = (r["domain"], ("short", "medium", "long")[cls])
        by_class[key] = by_class.get(key, 0) + w * (n + extra)
    # The report's realised-vs-target table: targets are these expectations, realised the output.
    table = report["budget"]["by_domain_class"]
    for (d, c), target in by_class.items():
        assert table[d][c]["target"] == pytest.approx(target, rel=1e-6, abs=0.1)
    out = report["output_documents"]
    for d in expected:
        assert table[d]["total"]["realised"] == out[d]["tokens"] + out[d]["docs"] * extra
    assert "Budget: realised / target" in (tmp_path / "ds.stats.md").read_text()
    for d in expected:
        realised = out[d]["tokens"] + out[d]["docs"] * extra
        assert expected[d] == pytest.approx(up["total_tokens"] * up["domains"][d]["share"], rel=1e-6)
        assert abs(realised - expected[d]) <= 4 * np.sqrt(variance[d]) + 1, d
    ds = IndexedDataset(str(tmp_path / "ds"))  # keep it alive: its arrays view its mmap
    total = int(ds.sequence_lengths.sum())
    assert total == report["output"]["tokens"]
    assert abs(total - up["total_tokens"]) <= 4 * np.sqrt(sum(variance.values()))
    for d, p in report["plan"].items():  # shape of the policy, per domain
        w = p["weights"]
        assert (w["short"] / w["medium"], w["long"] / w["medium"]) == pytest.approx((0.25, 3.0), rel=1e-4)  # report rounds to 6 digits


def test_long_documents_split_only_when_asked(tmp_path):
    records = corpus_records(40, seed=6)
    path = write_jsonl(str(tmp_path / "c.jsonl"), records)
    whole = build_dataset(make_recipe([path], str(tmp_path / "whole")), progress=False)
    split = build_dataset(make_recipe([path], str(tmp_path / "split"),
                                      upsampling={"max_doc_tokens": 500}), progress=False)
    sep = len(whole["separators"]["separator_ids"])
    ds = IndexedDataset(str(tmp_path / "split"))
    assert ds.sequence_lengths.max() <= 500 + sep
    assert whole["output"]["documents"] == len(records) < split["output"]["documents"]
    assert split["output"]["tokens"] - split["output"]["documents"] * sep == \
        whole["output"]["tokens"] - whole["output"]["documents"] * sep


@pytest.mark.parametrize("override, field", [
    ("upsampling.short_keep_prob=1.5", "upsampling.short_keep_prob"),
    ("upsampling.long_factor=0.5", "upsampling.long_factor"),
    ("upsampling.long_threshold=100", "upsampling.long_threshold"),
    ("upsampling.total_tokens=-1", "upsampling.total_tokens"),
    ("upsampling.domains={a: {share: 0.5}, b: {share: 0.2}}", "upsampling.domains.*.share"),
    ("upsampling.domains={a: {share: 0.5}, b: {}}", "upsampling.domains.*.share"),
    ("upsampling.sead=3", "upsampling.sead"),
    ("separator.position=middle", "separator.position"),
    ("tokenizer.fast_path=maybe", "tokenizer.fast_path"),
    ("output.length_buckets=[10, 5]", "output.length_buckets"),
    ("workers=-1", "workers"),
])
def test_recipe_validation_names_the_field(tmp_path, override, field):
    path = tmp_path / "r.yaml"
    path.write_text("inputs: [x.jsonl]\ntokenizer: {path: t.json}\noutput: {prefix: out/ds}\n")
    load_recipe(str(path))  # the base recipe is valid
    with pytest.raises(ValueError, match=field.replace("*", r"\*")):
        load_recipe(str(path), [override])


def test_recipe_requires_tokenizer_and_inputs():
    with pytest.raises(ValueError, match="tokenizer"):
        recipe_from_dict({"inputs": ["x"], "output": {"prefix": "o"}})
    with pytest.raises(ValueError, match="inputs"):
        recipe_from_dict({"inputs": [], "tokenizer": {"path": "t"}, "output": {"prefix": "o"}})
