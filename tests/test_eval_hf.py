"""The HF backend and the runners end to end on a tiny random Llama (CPU).

References: transformers' own `generate(do_sample=False)` for greedy decoding, a single full
forward for per-token losses, and an oracle backend (reads the needle back out of the prompt) for
the grid/JSON/heatmap plumbing, which must then score 100% everywhere, and 0% for a wrong answer.
"""
import json
import re

import pytest
import torch

from eval_helpers import tiny_eval_llama, train_tiny_tokenizer
from megatron_ultralong.eval import EvalTokenizer, HFBackend, NiahConfig, loss_by_position, run_niah, run_ruler
from megatron_ultralong.eval.perplexity import bucket_edges


@pytest.fixture(scope="module")
def tok():
    return EvalTokenizer.wrap(train_tiny_tokenizer())


@pytest.fixture(scope="module")
def hf(tok):
    return tiny_eval_llama(tok.vocab_size)


class OracleBackend:
    """Answers from the prompt text: every "... is: N" / "pass key is N" value, or VAR chains."""

    is_writer = True

    def __init__(self, tok, wrong=False):
        self.tok, self.wrong = tok, wrong

    def generate(self, ids, max_new_tokens, stop_ids=()):
        text = self.tok.decode(ids)
        question = text[text.rindex("\n", 0, len(text) - 1) :]
        if "VAR" in text:
            value = re.search(r"assigned the value (\d+)", question).group(1)
            names, frontier = [], {value}
            for lhs, rhs in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", text):
                if rhs in frontier:
                    names.append(lhs)
                    frontier.add(lhs)
            answer = " ".join(names)
        elif "pass key" in text:
            answer = re.search(r"pass key is (\d+)", text).group(1)
        else:
            keys = re.findall(r"[a-z]+-[a-z]+", question)
            answer = " ".join(v for k, v in re.findall(r"numbers for ([a-z]+-[a-z]+) is: (\d+)", text) if k in keys)
        if self.wrong:
            answer = "0" + answer
        return self.tok.encode(" " + answer)[:max_new_tokens] if not self.wrong else self.tok.encode(answer)


def test_greedy_generation_equals_transformers_generate(tok, hf):
    backend = HFBackend(hf, prefill_chunk=7)  # chunked prefill through the cache
    g = torch.Generator().manual_seed(0)
    for n in (5, 64):
        ids = torch.randint(2, tok.vocab_size, (n,), generator=g).tolist()
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           pad_token_id=1, eos_token_id=None)[0, n:].tolist()
        assert backend.generate(ids, 8) == want
        assert backend.generate(ids, 8, stop_ids=[want[2]]) == want[: want.index(want[2]) + 1]
        torch.testing.assert_close(backend.next_token_logits(ids), hf(torch.tensor([ids])).logits[0, -1].detach())


def test_cache_is_passed_under_the_name_this_transformers_takes(tok, hf):
    """transformers 5 renamed forward's past_key_values to cache and removes the old name in 5.40:
    no deprecation warning about it (4.x takes past_key_values and warns about neither)."""
    import warnings

    backend = HFBackend(hf)
    ids = torch.randint(2, tok.vocab_size, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.generate(ids, 3)
        backend.generate_many(ids, [[5], [6, 7]], 2)
        backend.token_losses(ids)
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


def test_token_losses_equal_a_full_forward(tok, hf):
    ids = torch.randint(2, tok.vocab_size, (97,), generator=torch.Generator().manual_seed(1)).tolist()
    full = torch.nn.functional.cross_entropy(hf(torch.tensor([ids])).logits[0, :-1].detach(),
                                             torch.tensor(ids[1:]), reduction="none")
    for chunk in (10, 96, 200):
        torch.testing.assert_close(HFBackend(hf, loss_chunk=chunk).token_losses(ids), full, rtol=0, atol=1e-5)


def test_niah_grid_writes_json_and_heatmap(tok, hf, tmp_path):
    lengths, depths = [200, 320], [0.0, 0.5, 1.0]
    res = run_niah(HFBackend(hf), tok, lengths, depths, str(tmp_path), NiahConfig(max_new_tokens=4), log=False)
    with open(res.json_path) as f:
        data = json.load(f)
    assert data["lengths"] == lengths and data["depths"] == depths
    assert len(data["samples"]) == 6 and all(s["length"] in lengths for s in data["samples"])
    assert all(s["generated_tokens"] <= 4 for s in data["samples"])
    with open(res.heatmap_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Re-scoring the stored predictions reproduces the stored scores.
    from megatron_ultralong.eval.scoring import score

    assert [s["score"] for s in data["samples"]] == [score(s["prediction"], s["answers"]) for s in data["samples"]]


def test_oracle_scores_100_and_wrong_answers_0(tok, tmp_path):
    res = run_niah(OracleBackend(tok), tok, [200, 400], [0.0, 0.3, 1.0], str(tmp_path / "ok"), log=False)
    assert res.scores == ((1.0, 1.0),) * 3
    bad = run_niah(OracleBackend(tok, wrong=True), tok, [200], [0.5], None, log=False)
    assert bad.scores == ((0.0,),)
    ruler = run_ruler(OracleBackend(tok), tok, [700, 900], str(tmp_path / "ruler"), samples_per_length=2, log=False)
    assert all(v == 100.0 for per_len in ruler["scores"].values() for v in per_len.values()), ruler["scores"]
    assert ruler["effective_length"] == 900
    with open(ruler["json_path"]) as f:
        assert set(json.load(f)["scores"]) == {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"}


def test_loss_by_position_buckets_the_per_token_losses(tok, hf, tmp_path):
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(2, tok.vocab_size, (130,), generator=g).tolist() for _ in range(2)]
    backend = HFBackend(hf, loss_chunk=32)
    res = loss_by_position(backend, docs, seq_len=121, num_buckets=4, out_dir=str(tmp_path))
    assert res["edges"] == [0, 30, 60, 90, 120] and res["tokens"] == [60, 60, 60, 60]
    losses = torch.stack([backend.token_losses(d[:121]) for d in docs])  # [2, 120]
    want = [losses[:, a:b].mean().item() for a, b in zip(res["edges"], res["edges"][1:])]
    assert res["mean_loss"] == pytest.approx(want, abs=1e-6)
    assert (tmp_path / "ppl_by_position.png").stat().st_size > 1000
    assert bucket_edges(1025, 10, log_spaced=True)[:4] == [0, 1, 2, 4] and bucket_edges(1025, 10, True)[-1] == 1024
    with pytest.raises(ValueError, match="fewer than --seq-len 200"):
        loss_by_position(backend, docs, seq_len=200)


def test_prompt_outside_the_vocabulary_is_refused(hf):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        HFBackend(hf).generate([1, 10_000], 2)
    with pytest.raises(ValueError, match="--lengths"):
        run_niah(HFBackend(hf), None, [], [0.5], None)
