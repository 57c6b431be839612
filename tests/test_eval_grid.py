"""The grid runner for long runs, on the tiny HF model (CPU, one process).

- resume after a killed run: the cells file keeps every finished cell; a partial last line (killed
  mid-write) is dropped; the re-run computes exactly the missing cells and its results equal an
  uninterrupted run's; a file from another configuration is refused;
- progress lines: cell i/N, elapsed, ETA;
- prompts past max_position_embeddings: a warning, or a refusal naming the flag;
- --max-new-tokens defaults to the answer's tokens + a margin;
- the RULER plot's y-axis is 0-100 and the heatmap marks the trained length;
- niah_multiquery with split queries prefills its context once (the cache fork) and scores like
  the separate prompts it replaces.
"""
import json
import logging

import matplotlib.figure
import pytest

from eval_helpers import tiny_llama, train_tiny_tokenizer
from megatron_ultralong.eval import EvalTokenizer, HFBackend, NiahConfig, run_niah, run_ruler
from megatron_ultralong.eval.report import trained_length_x
from megatron_ultralong.eval.tasks import ANSWER_MARGIN, make_sample

LENGTHS, DEPTHS = [160, 200], [0.0, 0.5, 1.0]
CFG = NiahConfig(max_new_tokens=3)


@pytest.fixture(scope="module")
def tok():
    return EvalTokenizer.wrap(train_tiny_tokenizer())


@pytest.fixture(scope="module")
def hf(tok):
    return tiny_llama(tok.vocab_size, max_position_embeddings=180)


class Killed(Exception):
    pass


class CountingBackend(HFBackend):
    """HFBackend that records every prompt length it generates for and can die after k prompts."""

    def __init__(self, model, die_after=None):
        super().__init__(model)
        self.prompts, self.die_after = [], die_after

    def generate(self, ids, max_new_tokens, stop_ids=()):
        if self.die_after is not None and len(self.prompts) == self.die_after:
            raise Killed
        self.prompts.append(tuple(ids))
        return super().generate(ids, max_new_tokens, stop_ids)


def test_resume_after_a_killed_run_computes_each_cell_once(tok, hf, tmp_path):
    want = run_niah(CountingBackend(hf), tok, LENGTHS, DEPTHS, None, CFG, log=False)
    first = CountingBackend(hf, die_after=4)
    with pytest.raises(Killed):
        run_niah(first, tok, LENGTHS, DEPTHS, str(tmp_path), CFG, log=False)
    cells = tmp_path / "niah_cells.jsonl"
    lines = cells.read_text().splitlines()
    assert len(lines) == 1 + 4  # header + the 4 cells finished before the kill
    with open(cells, "a") as f:
        f.write('{"cell": "length=200/depth=0.5", "resu')  # killed in the middle of writing a line
    second = CountingBackend(hf)
    got = run_niah(second, tok, LENGTHS, DEPTHS, str(tmp_path), CFG, log=False)
    assert len(second.prompts) == len(LENGTHS) * len(DEPTHS) - 4  # only the missing cells
    assert not set(first.prompts) & set(second.prompts)  # none computed twice
    assert got.scores == want.scores
    assert [s["prediction"] for s in got.samples] == [s["prediction"] for s in want.samples]
    assert len(cells.read_text().splitlines()) == 1 + len(LENGTHS) * len(DEPTHS)
    third = CountingBackend(hf)
    run_niah(third, tok, LENGTHS, DEPTHS, str(tmp_path), CFG, log=False)
    assert third.prompts == []  # everything done: nothing recomputed
    with pytest.raises(ValueError, match="niah_cells.jsonl: written by a run with a different configuration"):
        run_niah(third, tok, LENGTHS, DEPTHS, str(tmp_path), NiahConfig(max_new_tokens=4), log=False)
    other_model = HFBackend(tiny_llama(tok.vocab_size, seed=1, max_position_embeddings=180))
    with pytest.raises(ValueError, match="niah_cells.jsonl: written by a run with a different configuration"):
        run_niah(other_model, tok, LENGTHS, DEPTHS, str(tmp_path), CFG, log=False)  # other weights: not mixed in


def test_a_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(tok, hf, tmp_path):
    run_niah(HFBackend(hf), tok, LENGTHS[:1], DEPTHS[:2], str(tmp_path), CFG, log=False)
    cells = tmp_path / "niah_cells.jsonl"
    lines = cells.read_text().splitlines()
    cells.write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(ValueError, match="niah_cells.jsonl line 2: not valid JSON"):
        run_niah(HFBackend(hf), tok, LENGTHS[:1], DEPTHS[:2], str(tmp_path), CFG, log=False)


def test_progress_lines_give_cell_elapsed_and_eta(tok, hf, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_ultralong.eval.grid"):
        run_niah(HFBackend(hf), tok, [160], DEPTHS, None, CFG)
    lines = [r.getMessage() for r in caplog.records if "cell" in r.getMessage()]
    assert len(lines) == 3
    for i, line in enumerate(lines, 1):
        assert f"cell {i}/3 length 160 depth" in line and "elapsed 0:00:" in line and "ETA 0:00:" in line, line
    assert lines[-1].endswith("ETA 0:00:00")


def test_over_length_warns_or_refuses(tok, hf, caplog):
    # max_position_embeddings=180: 200 + 3 new tokens is past it.
    with caplog.at_level(logging.WARNING, logger="megatron_ultralong.eval.grid"):
        run_niah(HFBackend(hf), tok, [200], [0.5], None, CFG, log=False)
    assert any("exceeds the model's max_position_embeddings=180" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="--lengths: a 200-token prompt .* max_position_embeddings=180"):
        run_niah(HFBackend(hf), tok, [160, 200], [0.5], None, NiahConfig(max_new_tokens=3, over_length="refuse"))
    with pytest.raises(ValueError, match="over_length='skip'"):
        NiahConfig(over_length="skip")


def test_max_new_tokens_defaults_to_the_answer_plus_a_margin(tok, hf):
    res = run_niah(HFBackend(hf), tok, [160], [0.5], None, NiahConfig(), log=False)
    value = res.samples[0]["answers"][0]
    budget = len(tok.encode(" " + value)) + ANSWER_MARGIN
    assert budget < 16  # the old fixed default
    assert res.samples[0]["generated_tokens"] <= budget
    sample = make_sample("niah_multivalue", tok, 300, 0)
    assert sample.max_new_tokens == len(tok.encode(" " + ", ".join(sample.answers))) + ANSWER_MARGIN


def test_split_multiquery_prefills_the_context_once(tok, hf):
    backend = HFBackend(hf)
    res = run_ruler(backend, tok, [400], None, tasks=["niah_multiquery"], samples_per_length=1, log=False,
                    split_queries=True)
    sample = make_sample("niah_multiquery", tok, 400, 0, split_queries=True)
    assert len(sample.questions) == 4 and backend.prefilled_tokens == sample.context_len
    # The same questions as 4 separate prompts: the same answers, each prompt prefilled whole.
    separate = HFBackend(hf)
    preds = [tok.decode(separate.generate(list(sample.prompt.ids[: sample.context_len]) + list(q.suffix),
                                          q.max_new_tokens, tok.stop_ids)) for q in sample.questions]
    assert res["samples"][0]["prediction"] == "\n".join(preds)
    assert separate.prefilled_tokens > 4 * sample.context_len


def test_plots_ruler_axis_0_to_100_and_heatmap_trained_length(tok, hf, tmp_path, monkeypatch):
    seen = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen.append((ax.get_ylim(), [line.get_xdata()[0] for line in ax.get_lines()]))
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    run_ruler(HFBackend(hf), tok, [300], str(tmp_path), tasks=["niah_single"], samples_per_length=1, log=False)
    assert seen[-1][0] == (0.0, 100.0)
    run_niah(HFBackend(hf), tok, LENGTHS, [0.5], str(tmp_path / "n"), CFG, log=False, trained_length=170)
    assert seen[-1][1] == [pytest.approx(trained_length_x(LENGTHS, 170))]
    assert 0.0 < trained_length_x(LENGTHS, 170) < 1.0
    assert trained_length_x([1024, 4096], 2048) == pytest.approx(0.5)
    assert trained_length_x([1024, 4096], 4096) == pytest.approx(1.0)
    assert trained_length_x([1024, 4096], 8192) is None
    with open(tmp_path / "n" / "niah_results.json") as f:
        assert json.load(f)["lengths"] == LENGTHS
