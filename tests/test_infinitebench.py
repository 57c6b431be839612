"""InfiniteBench: each task's parser on cases built from `src/compute_scores.py`'s behaviour
(github.com/OpenBMB/InfiniteBench), prompts and answers as `src/eval_utils.py` builds them,
truncation, the loader on the dataset's `<task>.jsonl` layout, and a run end to end."""
from __future__ import annotations

import json
import os

import pytest
from eval_helpers import train_tiny_tokenizer

from megatron_ultralong.eval.infinitebench import metrics as M
from megatron_ultralong.eval.infinitebench.loader import load_samples
from megatron_ultralong.eval.infinitebench.prompts import (MAX_NEW_TOKENS, TASKS, TEMPLATES, create_prompt, get_answer,
                                                           truncate)
from megatron_ultralong.eval.infinitebench.run import run_infinitebench, run_task

S = M.sample_score


def test_retrieval_tasks_take_the_first_number_or_a_whole_word():
    assert S("passkey", "71432.", "71432") == 1.0
    assert S("passkey", "The pass key is 71432", ["71432"]) == 1.0  # list labels are unwrapped
    assert S("passkey", "1 and then 71432", "71432") == 0.0  # only the first digit run counts
    assert S("number_string", "", ["3000077442"]) == 0.0
    assert S("kv_retrieval", 'The value is "abc-123".', "abc-123") == 1.0
    assert S("kv_retrieval", "abc-1234", "abc-123") == 0.0  # whole words, not substrings
    assert S("kv_retrieval", "abc-123", ["abc-123"]) == 0.0  # upstream never unwraps a list label here


def test_multiple_choice_parser():
    label = ["Walking Georgie", "A"]
    assert S("longbook_choice_eng", " A", label) == 1.0
    assert S("longbook_choice_eng", "An apple", label) == 1.0  # the first character alone decides
    assert S("longbook_choice_eng", "B", label) == 0.0
    assert S("longbook_choice_eng", "Walking Georgie", label) == 1.0
    assert S("longbook_choice_eng", "The answer is: A.", label) == 1.0
    assert S("longbook_choice_eng", "I think the option is C", label) == 0.0
    assert S("longbook_choice_eng", "maybe D or A", label) == 0.0  # the first lone letter: D
    assert S("longbook_choice_eng", "   ", label) == 0.0


def test_code_tasks():
    label = ["repack_carchive", "B"]
    assert S("code_debug", "B. repack", label) == 1.0
    assert S("code_debug", "B:", label) == 1.0
    # "option" is blanked before the prefixes are looked for, so "is:" finds the answer.
    assert S("code_debug", "The correct option is: B", label) == 1.0
    assert S("code_debug", "answer: repack_carchive", label) == 1.0
    assert S("code_debug", "B", label) == 0.0  # a bare letter is not credited upstream
    assert S("code_run", "the value is 4", 4) == 1.0
    assert S("code_run", "the value is -4.", [-4]) == 1.0  # "." is a separator, "-" is not
    assert S("code_run", "the value is 4`", -4) == 0.0
    assert S("code_run", "4 apples", 4) == 0.0  # the last word must be the number
    assert S("code_run", "", 4) == 0.0


def test_math_tasks_and_the_model_name_dependent_parser():
    assert S("math_find", "88\nThe smallest is 1", 88) == 1.0
    assert S("math_find", "It is 3.5", [3.5]) == 1.0
    assert S("math_find", "none", 3) == 0.0
    with pytest.raises(ValueError, match="math_find"):
        S("math_find", "3.5", 3)
    assert S("math_calc", "[1, 4, 8]", [1, 4, 8]) == 1.0
    assert S("math_calc", "[1, 5, 8]", [1, 4, 8]) == pytest.approx(1 / 3)  # counts the correct prefix
    # For model_name "gpt4" upstream drops the first number of the prediction; no other name does.
    assert S("math_calc", "1, 1, 4, 8", [1, 4, 8], model_name="gpt4") == 1.0
    assert S("math_calc", "1, 1, 4, 8", [1, 4, 8], model_name="yarn-mistral") == pytest.approx(1 / 3)
    assert S("math_calc", "1, 4, 8", [[1, 4, 8]], model_name="gpt4") == 0.0


def test_dialogue_and_free_form_qa():
    assert S("longdialogue_qa_eng", "ace.", ["ACE", "ACE ROTHSTEIN"]) == 1.0
    assert S("longdialogue_qa_eng", "Nicky", ["ACE"]) == 0.0
    assert S("longbook_qa_eng", "Fighting in World War 1.", ["fighting in world war 1"]) == 1.0
    # best over several references; articles and punctuation dropped
    assert S("longbook_qa_eng", "the war", ["peace", "a war"]) == 1.0
    assert S("longbook_qa_eng", "", ["war"]) == 0.0
    # Chinese: F1 over characters after punctuation is removed: P 1, R 1/2.
    assert S("longbook_qa_chn", "田立帆", ["田立帆，商老太"]) == pytest.approx(2 / 3)


def test_summary_is_rouge_lsum():
    assert S("longbook_sum_eng", "The cat sat on the mat.", "The cat sat on the mat.") == pytest.approx(1.0)
    # LCS 3 of 3 predicted and 6 reference tokens: P 1, R 1/2, F 2/3.
    assert S("longbook_sum_eng", "the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert S("longbook_sum_eng", "", "the cat") == 0.0
    # several references: the best one (evaluate's score_multi)
    assert S("longbook_sum_eng", "the cat sat", ["dogs", "the cat sat"]) == pytest.approx(1.0)


def test_task_score_is_percent_of_the_mean_and_average_needs_all_tasks():
    assert M.score_infinitebench("passkey", ["1", "2", "3"], ["1", "2", "4"]) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="unknown InfiniteBench task 'pass'"):
        M.score_infinitebench("pass", ["1"], ["1"])
    assert M.average({t: 10.0 for t in TASKS}) == 10.0
    assert M.average({"passkey": 100.0}) is None
    assert set(M.SCORERS) == set(TASKS) == set(MAX_NEW_TOKENS) == set(TEMPLATES["yarn-mistral"])


def test_prompts_and_answers_as_eval_utils_builds_them():
    eg = {"context": "CTX", "input": "What is the value of func_3(-7)?", "answer": [12]}
    assert create_prompt(eg, "code_run") == TEMPLATES["yarn-mistral"]["code_run"].format(
        func="func_3", func_call="func_3(-7)", context="CTX")
    # "The ... of" is matched greedily, up to the last " of": "The largest number of a list of".
    eg = {"context": "1, 2", "input": "What is The largest number of a list of?", "answer": [2]}
    assert create_prompt(eg, "math_find") == ("What is the largest number of a list in the following list?\n\n1, 2"
                                              "\n\nWhat is The largest number of a list of?")
    eg = {"context": "C", "input": "Q?", "answer": "two", "options": ["one", "two", "three", "four"]}
    assert get_answer(eg, "longbook_choice_eng") == ["two", "B"]
    assert get_answer(dict(eg, answer=["two"]), "code_debug") == ["two", "B"]
    # kv_retrieval's one-element list becomes the string upstream's published predictions hold,
    # which its word match can find (a list label never matches).
    assert get_answer({"answer": ["abc-123"]}, "kv_retrieval") == "abc-123"
    assert get_answer({"answer": ["71432"]}, "passkey") == ["71432"]
    assert create_prompt(eg, "longbook_choice_eng", "gpt4").endswith("A. one\nB. two\nC. three\nD. four")
    assert create_prompt({"context": "C", "input": "Q"}, "passkey").endswith("Q\n\nThe pass key is")
    with pytest.raises(ValueError, match="not one of the options"):
        get_answer(dict(eg, answer="five"), "longbook_choice_eng")


def test_truncation_keeps_both_ends_and_is_off_with_none():
    tok = train_tiny_tokenizer()
    text = " ".join(f"w{i}" for i in range(300))
    ids = tok.encode(text)
    assert truncate(tok, text, None) == text
    assert truncate(tok, text, len(ids)) == text
    out = truncate(tok, text, 64)
    assert out == tok.decode(ids[:32] + ids[-32:], skip_special_tokens=True)
    assert out.startswith("w0 w1") and out.endswith("w299")


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def test_loader_checks_the_fields_its_task_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="passkey.jsonl"):
        load_samples(str(tmp_path), "passkey")
    _write(str(tmp_path / "code_debug.jsonl"), [{"id": 0, "context": "c", "input": "", "answer": ["f"],
                                                "options": ["f", "g"]}])
    with pytest.raises(ValueError, match=r"code_debug.jsonl:1: field 'options'"):
        load_samples(str(tmp_path), "code_debug")


def test_run_task_writes_upstream_rows_and_scores_them(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _write(str(data / "passkey.jsonl"), [
        {"id": i, "context": "noise " * 50 + f"The pass key is {k}. " + "noise " * 50,
         "input": "What is the pass key?", "answer": [k], "options": []} for i, k in enumerate(["123", "456"])])
    _write(str(data / "longbook_choice_eng.jsonl"), [
        {"id": 0, "context": "book", "input": "Who?", "answer": ["Bob"], "options": ["Al", "Bob", "Cy", "Di"]}])
    budgets = []

    def generate(prompt: str, max_new_tokens: int) -> str:
        budgets.append(max_new_tokens)
        return " 123." if "123" in prompt else ("B" if "book" in prompt else "999")

    tok = train_tiny_tokenizer()
    res = run_task(generate, tok, str(data), "passkey", str(out))
    assert res["score"] == 50.0 and res["n"] == 2 and budgets == [6, 6]
    rows = [json.loads(line) for line in open(res["path"])]
    assert rows[0] == {"id": 0, "prediction": " 123.", "ground_truth": ["123"]}
    # truncated to 16 tokens the needle in the middle is gone: both predictions fail
    assert run_task(generate, tok, str(data), "passkey", str(out), truncate_tokens=16)["score"] == 0.0
    result = run_infinitebench(generate, tok, str(data), str(out), tasks=["passkey", "longbook_choice_eng"])
    assert result["scores"] == {"passkey": 50.0, "longbook_choice_eng": 100.0}
    assert result["average"] is None  # not all 12 tasks
    assert json.load(open(out / "infinitebench_results.json"))["scores"] == result["scores"]


def test_text_generate_over_the_hf_backend_equals_hf_generate(tmp_path):
    """The runners' generate(prompt, n) over a token backend: BOS + prompt, greedy, stop id dropped;
    checked against transformers' own greedy `generate` on the tiny Llama."""
    import torch
    from eval_helpers import tiny_eval_llama

    from megatron_ultralong.eval.backends import HFBackend
    from megatron_ultralong.eval.textgen import text_generate
    from megatron_ultralong.eval.tokenizer import EvalTokenizer

    tok = train_tiny_tokenizer()
    model = tiny_eval_llama(len(tok))
    generate = text_generate(HFBackend(model), EvalTokenizer.wrap(tok))
    data = tmp_path / "data"
    _write(str(data / "passkey.jsonl"), [{"id": 0, "context": "noise " * 20 + "The pass key is 42. " + "noise " * 20,
                                          "input": "What is the pass key?", "answer": ["42"]}])
    res = run_task(generate, tok, str(data), "passkey", str(tmp_path / "out"), truncate_tokens=None)
    prompt = create_prompt(json.loads((data / "passkey.jsonl").read_text()), "passkey")
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt)])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert json.loads(open(res["path"]).readline())["prediction"] == expected
