"""RULER's generators (github.com/NVIDIA/RULER scripts/data/synthetic/*.py) on fixtures in the
exact file layouts RULER downloads: prompts fit the length in the model's tokens, the answers are
where RULER puts them, templates and answer prefixes are RULER's."""
import collections
import os
import re

import pytest

from eval_helpers import train_ruler_tokenizer
from megatron_ultralong.eval.ruler.constants import BASE_TASKS, TASKS
from megatron_ultralong.eval.ruler.inputs import RulerInputs, read_hotpotqa, read_squad
from megatron_ultralong.eval.ruler.synthetic import Resources, generate, zeta

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "ruler")


@pytest.fixture(scope="module")
def env():
    import nltk

    nltk.data.path.insert(0, os.path.join(FIX, "nltk_data"))
    tok = train_ruler_tokenizer()
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    res = Resources(RulerInputs(*(os.path.join(FIX, f) for f in (
        "PaulGrahamEssays.json", "squad.json", "hotpotqa.json", "english_words.json"))))
    return count, res


def _check_fit(samples, count, length, task, min_frac=0.6):
    ttg = TASKS[task].spec.tokens_to_generate
    for s in samples:
        assert s.length == count(s.prompt) + ttg <= length
        assert s.length > length * min_frac, (task, s.length)  # the haystack was grown, not left minimal


def test_zeta_matches_the_closed_form():
    import math
    assert zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-13)
    assert zeta(4.0) == pytest.approx(math.pi ** 4 / 90, rel=1e-13)


def test_qa_readers_follow_rulers_layout():
    qas, docs = read_squad(os.path.join(FIX, "squad.json"))
    assert [q["query"] for q in qas] == ["Where does the Nile flow into?",
                                         "How many countries does the Danube pass through?", "In which range is Everest?"]
    assert qas[0]["outputs"] == ["the Mediterranean Sea", "Mediterranean Sea"]  # every answer text kept
    assert docs == sorted(docs) and len(docs) == 4  # de-duplicated, sorted; impossible question skipped
    assert [docs[i] for i in qas[0]["more_context"]] == ["The Danube passes through ten countries, more than any other river."]
    hq, hdocs = read_hotpotqa(os.path.join(FIX, "hotpotqa.json"))
    assert "Nile\nThe Nile is a river in Africa." in hdocs  # "title\n" + joined sentences
    assert len(hdocs) == 5 and hq[1]["outputs"] == ["Himalayas"]


@pytest.mark.parametrize("task,length", [("niah_multikey_3", 1024), ("niah_multikey_3", 4096), ("vt", 1024),
                                         ("vt", 4096), ("fwe", 2048), ("qa_1", 2048), ("qa_2", 2048)])
def test_fit_and_answers(env, task, length):
    count, res = env
    samples = generate(task, 2, length, count, res, seed=7)
    _check_fit(samples, count, length, task)
    s = samples[0]
    spec = TASKS[task].spec
    assert s.answer_prefix.startswith(spec.answer_prefix[:10])
    if task == "niah_multikey_3":
        # needle haystack: every line is a needle; exactly one carries the queried key
        key = re.search(r"for (\S+) mentioned", s.answer_prefix).group(1)
        assert s.input.count(f"One of the special magic uuids for {key} is: {s.outputs[0]}.") == 1
        assert s.input.startswith("A special magic uuid is hidden")  # RULER's singular rewrite
        assert s.answer_prefix == f" The special magic uuid for {key} mentioned in the provided text is"
    elif task == "vt":
        value = re.search(r"assigned the value (\d+)", s.answer_prefix).group(1)
        a = s.outputs
        assert len(a) == 5 and f"VAR {a[0]} = {value}" in s.input
        for x, y in zip(a, a[1:]):
            assert f"VAR {y} = VAR {x} " in s.input
        # the one-shot example (3-letter names, a complete answer) precedes the task
        first = s.input.index(spec.template[:20])
        assert s.input.index(spec.template[:20], first + 1) > first
        assert re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}\n", s.input)  # RULER: prefix space + " "
    elif task == "fwe":
        words = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        top = [w for w, _ in collections.Counter(words).most_common(4)]
        assert top[0] == "..." and top[1:] == s.outputs
    else:
        assert s.input.endswith("Question: " + ("Where does the Nile flow into?" if task == "qa_1"
                                                 else "Are the Nile and the Danube both rivers?"))
        assert s.answer_prefix == " Answer:" and "Document 1:\n" in s.input
    # a cell is reproducible by itself
    again = generate(task, 2, length, count, res, seed=7)
    assert [x.prompt for x in again] == [x.prompt for x in samples]


def test_cwe_common_words_repeat_as_ruler_sets(env):
    count, res = env
    s = generate("cwe", 1, 2048, count, res, seed=3)[0]
    _check_fit([s], count, 2048, "cwe")
    main = s.input.rsplit("Below is a numbered list", 1)[1]
    words = collections.Counter(re.findall(r"\d+\. (\S+)", main.split("\nQuestion:")[0]))
    # below 4K RULER repeats the 10 common words 6 times and the others once
    assert {w: words[w] for w in s.outputs} == {w: 6 for w in s.outputs}
    assert set(words.values()) == {6, 1}


@pytest.mark.slow
def test_word_key_and_essay_tasks(env):
    """The 8 NIAH variants at 4K (builds niah.py's adjective-noun key pool once: ~6M strings)."""
    count, res = env
    for task in [t for t in TASKS if t.startswith("niah")]:
        samples = generate(task, 1, 4096, count, res, seed=1)
        # a uuid needle line is ~80 tiny-tokenizer tokens: RULER's 25-line step is half of 4K here
        _check_fit(samples, count, 4096, task, min_frac=0.4)
        s = samples[0]
        a = TASKS[task].args
        for v in s.outputs:
            assert f" is: {v}." in s.input
        n_needles = max(a["num_needle_k"], a["num_needle_q"]) * a["num_needle_v"]
        if a["type_haystack"] != "needle":
            assert s.input.count("One of the special magic") == n_needles
        if a["type_haystack"] == "noise":
            assert "The grass is green. The sky is blue." in s.input
        if a["type_haystack"] == "essay":
            assert "startup ideas" in s.input
        plural = a["num_needle_q"] * a["num_needle_v"] > 1
        assert s.input.startswith("Some special magic" if plural else "A special magic")


def test_missing_input_is_one_line_error(env, tmp_path):
    count, _ = env
    res = Resources(RulerInputs())
    with pytest.raises(ValueError, match=r"--ruler-squad \(inputs.squad_json\): required"):
        generate("qa_1", 1, 2048, count, res)
    bad = tmp_path / "squad.json"
    bad.write_text('{"data": [{"title": "x"}]}')
    with pytest.raises(ValueError, match="not the SQuAD v2 layout"):
        generate("qa_1", 1, 2048, count, Resources(RulerInputs(squad_json=str(bad))))
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate("niah", 1, 2048, count, res)
    assert set(BASE_TASKS) == {t.base for t in TASKS.values()}


def test_inputs_are_checked_before_any_model_work():
    from megatron_ultralong.eval.ruler.runner import RulerBenchmark, RulerConfig

    # cwe reads english_words.json whatever the length, as RULER's script does at start
    with pytest.raises(ValueError, match=r"--ruler-english-words \(inputs.english_words_json\): required"):
        RulerBenchmark(RulerConfig(lengths=(2048,), tasks=("cwe",))).check_inputs()
    with pytest.raises(ValueError, match=r"--ruler-essays \(inputs.essay_json\)='/nonexistent.json': cannot read"):
        RulerBenchmark(RulerConfig(lengths=(2048,), tasks=("niah_single_2",),
                                   inputs=RulerInputs(essay_json="/nonexistent.json"))).check_inputs()
    with pytest.raises(ValueError, match="ruler.tasks"):
        RulerConfig(lengths=(2048,), tasks=("niah",))
