"""Exact and substring scoring, edge cases included."""
import pytest

from megatron_ultralong.eval.ruler import effective_length
from megatron_ultralong.eval.scoring import (
    contains_answer,
    exact_match,
    normalize_prediction,
    score,
    string_match_all,
    string_match_part,
)


def test_substring_match_is_case_insensitive_and_ignores_control_characters():
    assert contains_answer(" The pass key is 4821907.\n", "4821907")
    assert contains_answer("answer: Quiet-Harbor", "quiet-harbor")
    assert contains_answer("x\x00 4821907\x1b", "4821907")
    assert normalize_prediction("\t a\x00b \n") == "a b"


def test_a_longer_number_does_not_match_a_shorter_answer():
    # RULER's plain `in` would credit these; they are wrong answers.
    assert not contains_answer("12345678", "1234567")
    assert not contains_answer("91234567", "1234567")
    assert not contains_answer("ABCDEFG", "BCDEF")
    # Punctuation and spaces are boundaries; so is a non-alphanumeric reference end.
    assert contains_answer("(1234567)", "1234567")
    assert contains_answer("is:1234567,", "1234567")
    assert contains_answer("see (sky-blue)!", "(sky-blue)")


def test_string_match_all_is_the_fraction_of_references_found():
    refs = ["1111111", "2222222", "3333333", "4444444"]
    assert string_match_all("1111111, 3333333", refs) == 0.5
    assert string_match_all("4444444 3333333 2222222 1111111", refs) == 1.0
    assert string_match_all("", refs) == 0.0
    # A reference found twice still counts once.
    assert string_match_all("1111111 1111111", refs) == 0.25


def test_string_match_part_is_any():
    assert string_match_part("it is 2222222", ["1111111", "2222222"]) == 1.0
    assert string_match_part("nothing", ["1111111", "2222222"]) == 0.0


def test_exact_match_takes_the_first_line_and_ignores_closing_punctuation():
    assert exact_match(" 4821907.\nThe next line", ["4821907"]) == 1.0
    assert exact_match("  4821907 ", ["4821907."]) == 1.0
    assert exact_match("The pass key is 4821907", ["4821907"]) == 0.0
    assert exact_match("", ["4821907"]) == 0.0
    assert exact_match("\n4821907", ["4821907"]) == 1.0  # leading blank lines are not the answer


@pytest.mark.parametrize("bad", [[], [""], ["  "], [None]])
def test_bad_references_are_refused(bad):
    with pytest.raises(ValueError):
        string_match_all("x", bad)


def test_a_single_string_reference_is_refused():
    with pytest.raises(TypeError, match="sequence of strings"):
        string_match_all("1234", "1234")


def test_score_dispatch():
    assert score("a 12 b", ["12"], "all") == 1.0
    assert score("a 12 b", ["12", "13"], "part") == 1.0
    assert score("12", ["12"], "exact") == 1.0
    with pytest.raises(ValueError, match="scorer='rouge'"):
        score("x", ["x"], "rouge")


def test_effective_length_is_the_last_length_before_the_first_failure():
    assert effective_length([4, 8, 16, 32], [95.0, 90.0, 80.0, 90.0], 85.6) == 8
    assert effective_length([4, 8], [50.0, 99.0], 85.6) is None
    assert effective_length([8, 4], [90.0, 95.0], 85.6) == 8
