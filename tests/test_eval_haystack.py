"""Prompts have exactly the requested length and needles sit exactly where they are reported.

Independent check: the tokenizer. The needle text is tokenized on its own and searched for in the
prompt ids; the tokens before it are decoded and must end with the prefix and the haystack prefix.
"""
import pytest

from eval_helpers import train_tiny_tokenizer
from megatron_ultralong.eval import EvalTokenizer, NiahConfig
from megatron_ultralong.eval.haystack import Haystack, haystack_text
from megatron_ultralong.eval.niah import make_niah_sample
from megatron_ultralong.eval.tasks import RULER_TASKS, make_sample


@pytest.fixture(scope="module")
def tok():
    return EvalTokenizer.wrap(train_tiny_tokenizer())


def _find(haystack_ids, needle_ids):
    n = len(needle_ids)
    return [i for i in range(len(haystack_ids) - n + 1) if list(haystack_ids[i : i + n]) == list(needle_ids)]


@pytest.mark.parametrize("length", [300, 1000, 5000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_needle_at_exact_token_depth_without_snapping(tok, length, depth):
    cfg = NiahConfig(snap_to_sentence=False)
    hay = Haystack(tok, "essay")
    sample = make_niah_sample(tok, hay, cfg, length, depth, 0)
    ids, (needle,) = sample.prompt.ids, sample.prompt.needles
    assert len(ids) == length
    prefix = [tok.bos_id] + tok.encode(cfg.prefix)
    h = sample.prompt.haystack_len
    assert h == length - len(prefix) - len(needle.ids) - len(tok.encode(cfg.question))
    expected_start = len(prefix) + round(depth * h)
    assert needle.start == expected_start
    assert _find(ids, tok.encode(cfg.needle.format(value=sample.answers[0]))) == [expected_start]
    assert needle.depth == pytest.approx(round(depth * h) / h)
    # The tokens before the needle are the prefix then the first round(depth*h) filler tokens.
    assert list(ids[len(prefix) : needle.start]) == hay.fill(round(depth * h))
    assert list(ids[-len(tok.encode(cfg.question)):]) == tok.encode(cfg.question)


@pytest.mark.parametrize("depth", [0.05, 0.33, 0.5, 0.77])
def test_snapped_needle_follows_a_sentence_end_and_reports_its_depth(tok, depth):
    hay = Haystack(tok, "essay")
    sample = make_niah_sample(tok, hay, NiahConfig(), 3000, depth, 1)
    (needle,) = sample.prompt.needles
    before = tok.decode(sample.prompt.ids[: needle.start])
    assert before.rstrip(" ").endswith((".", "!", "?", "\n")), before[-40:]
    at = round(needle.depth * sample.prompt.haystack_len)
    assert at <= round(depth * sample.prompt.haystack_len)
    # Moved back by at most one paragraph of the filler (its longest sentence-free stretch).
    assert depth - needle.depth < 0.1
    prefix_len = 1 + len(tok.encode(NiahConfig().prefix))
    assert needle.start == prefix_len + at


def test_haystack_repeats_filler_beyond_its_length(tok):
    hay = Haystack(tok, "noise")
    period = len(hay.filler)
    ids = hay.fill(3 * period + 5)
    assert ids[:period] == ids[period : 2 * period] == list(hay.filler)
    assert ids[3 * period :] == list(hay.filler[:5])
    assert tok.decode(hay.filler).startswith(haystack_text("noise")[:40])


@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_tasks_have_exact_length_and_all_needles_in_place(tok, task):
    for seed in range(3):
        s = make_sample(task, tok, 2000, seed)
        assert len(s.prompt.ids) == 2000
        starts = [n.start for n in s.prompt.needles]
        assert starts == sorted(starts)
        for n in s.prompt.needles:
            assert list(s.prompt.ids[n.start : n.start + len(n.ids)]) == list(n.ids)
        text = tok.decode(s.prompt.ids)
        for answer in s.answers:
            assert answer in text
        expected = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 4, "niah_multiquery": 4, "vt": 5}
        assert len(s.answers) == expected[task]
        if task == "vt":  # the chain is in order: each hop after the variable it reads
            assert [text.index(f"VAR {a} =") for a in s.answers] == sorted(text.index(f"VAR {a} =") for a in s.answers)


def test_samples_are_deterministic_in_the_seed(tok):
    a, b = make_sample("niah_multikey", tok, 800, 7), make_sample("niah_multikey", tok, 800, 7)
    c = make_sample("niah_multikey", tok, 800, 8)
    assert a.prompt.ids == b.prompt.ids and a.answers == b.answers
    assert c.answers != a.answers


def test_bad_inputs_are_refused_with_the_field_named(tok):
    hay = Haystack(tok, "essay")
    with pytest.raises(ValueError, match="context length 20 is too short"):
        make_niah_sample(tok, hay, NiahConfig(), 20, 0.5, 0)
    with pytest.raises(ValueError, match="depth 1.5"):
        hay.build_prompt(500, [(1.5, [5])])
    with pytest.raises(ValueError, match="haystack='poems'"):
        Haystack(tok, "poems")
    with pytest.raises(ValueError, match="NiahConfig.needle"):
        NiahConfig(needle="no placeholder")
    with pytest.raises(ValueError, match="task='qa'"):
        make_sample("qa", tok, 500, 0)
