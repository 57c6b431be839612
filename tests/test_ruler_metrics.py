"""RULER's scoring against cases built from its evaluator (github.com/NVIDIA/RULER
scripts/eval/evaluate.py postprocess_pred, scripts/eval/synthetic/constants.py metrics)."""
import pytest

from megatron_ultralong.eval.ruler.metrics import (RULER_TASK_NAMES, postprocess_pred, sample_score,
                                                   score_ruler, string_match_all, string_match_part)


def test_thirteen_tasks_and_their_metrics():
    assert len(RULER_TASK_NAMES) == 13
    # qa is string_match_part: one of several answers suffices
    assert score_ruler("qa_1", ["Paris, France"], [["paris", "Lyon"]]) == 100.0
    # niah/vt/cwe/fwe are string_match_all: the fraction of expected strings found
    for task in ("niah_multivalue", "vt", "cwe", "fwe"):
        assert score_ruler(task, ["Paris, France"], [["paris", "Lyon"]]) == 50.0


def test_case_insensitive_substring_quirks_kept():
    # RULER matches `r.lower() in pred.lower()`: a number inside a longer one counts
    assert score_ruler("niah_single_1", ["The number is 12345678."], [["1234567"]]) == 100.0
    assert score_ruler("niah_single_3", ["ABC-def"], [["abc-DEF"]]) == 100.0
    # an empty reference matches anything ("" in s is True)
    assert string_match_all(["nothing"], [[""]]) == 100.0
    assert score_ruler("qa_2", [""], [["x"]]) == 0.0


def test_postprocess_control_characters_and_strip():
    assert postprocess_pred("  a\tb\x00c\x1fd \n") == "a\nb\nc\nd"
    assert postprocess_pred("\x7f") == "\x7f"  # only \x00-\x1f, DEL stays
    # a reference spanning a tab does not match after the tab became a newline
    assert score_ruler("vt", ["X\tY"], [["x\ty"]]) == 0.0
    # text is stripped first, then control characters replaced, then stripped again
    assert score_ruler("vt", ["\x01 abc \x02"], [["abc"]]) == 100.0


def test_rounding_and_averaging_order():
    preds = ["a", "b", "c"]
    assert string_match_all(preds, [["a"], ["x"], ["x"]]) == 33.33
    assert string_match_all(preds, [["a"], ["b"], ["x"]]) == 66.67
    assert string_match_all(["a b"], [["a", "b", "c"]]) == 66.67
    # per-sample fractions averaged (not pooled references): (1/2 + 1/1) / 2 = 75
    assert string_match_all(["a", "b"], [["a", "x"], ["b"]]) == 75.0
    assert string_match_part(["a", "b", "c"], [["x", "a"], ["y"], ["c", "c"]]) == 66.67
    # RULER's exact float expression: sum(...)/n*100, then round(., 2)
    fr = [1 / 7, 2 / 7, 5 / 7]
    preds = ["a" * k for k in (1, 2, 5)]
    refs = [["a"] + ["z"] * 6, ["a", "a"] + ["z"] * 5, ["a"] * 5 + ["z"] * 2]
    assert string_match_all(preds, refs) == round(sum(fr) / 3 * 100, 2)


def test_sample_score_matches_the_task_metric():
    assert sample_score("niah_multikey_1", " 1 and 3", ["1", "2", "3", "4"]) == 0.5
    assert sample_score("qa_1", "yes", ["no", "YES"]) == 1.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown RULER task 'niah'"):
        score_ruler("niah", ["a"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        score_ruler("vt", [], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_ruler("vt", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="references 0"):
        score_ruler("vt", ["a"], ["a"])
    with pytest.raises(ValueError, match="references 0"):
        score_ruler("qa_1", ["a"], [[]])
