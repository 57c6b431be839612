"""`mu-eval-score` end to end: prediction files in each benchmark's own layout, scored as its
evaluator scores them; --json; --help lists every task; unknown tasks and bad rows are named."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_ultralong.eval.infinitebench.prompts import TASKS as IB_TASKS
from megatron_ultralong.eval.lveval.prompts import DATASETS as LV_DATASETS
from megatron_ultralong.eval.score_cli import main


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def _run(capsys, *argv):
    main(list(argv))
    return capsys.readouterr().out


def test_lveval_file_as_evaluation_py_scores_it(tmp_path, capsys):
    # hotpotwikiqa: keyword gate 0.2 then F1 against the first answer; 3 samples -> 1, 2/3, 0.
    path = _write(tmp_path / "hotpotwikiqa_mixup_16k.jsonl", [
        {"pred": "The Eiffel Tower.", "answers": ["eiffel tower", "x"], "gold_ans": "Eiffel", "input": "q",
         "all_classes": None, "length": 3},
        {"pred": "paris", "answers": ["of paris"], "gold_ans": "the river of paris"},
        {"pred": "of", "answers": ["of paris"], "gold_ans": "the river of paris"},
    ])
    out = json.loads(_run(capsys, "lveval", path, "--task", "hotpotwikiqa_mixup_16k", "--json"))
    assert out == {"benchmark": "lveval", "task": "hotpotwikiqa_mixup_16k", "score": round(100 * (5 / 3) / 3, 2),
                   "n": 3}
    assert out["score"] == 55.56
    # the task without its length suffix scores the same file the same way; gold_ans is optional
    assert _run(capsys, "lveval", path, "--task", "hotpotwikiqa_mixup").strip().endswith("55.56 (n=3)")
    nogold = _write(tmp_path / "f.jsonl", [{"pred": "paris", "answers": ["of paris"]}])
    assert json.loads(_run(capsys, "lveval", nogold, "--task", "factrecall_en", "--json"))["score"] == 66.67


def test_infinitebench_file_with_either_key_pair_and_the_model_name(tmp_path, capsys):
    a = _write(tmp_path / "preds_math_calc.jsonl", [{"id": 0, "prediction": "1, 1, 4, 8", "ground_truth": [1, 4, 8]},
                                                     {"id": 1, "prediction": "9", "ground_truth": [1, 4, 8]}])
    gpt4 = json.loads(_run(capsys, "infinitebench", a, "--task", "math_calc", "--model-name", "gpt4", "--json"))
    other = json.loads(_run(capsys, "infinitebench", a, "--task", "math_calc", "--json"))
    assert gpt4["score"] == pytest.approx(50.0) and other["score"] == pytest.approx(100 / 6) and gpt4["n"] == 2
    b = _write(tmp_path / "preds_longbook_choice_eng.jsonl", [{"id": 0, "pred": "A", "label": ["Al", "A"]},
                                                              {"id": 1, "pred": "C", "label": ["Bo", "B"]}])
    assert json.loads(_run(capsys, "infinitebench", b, "--task", "longbook_choice_eng", "--json"))["score"] == 50.0


def test_ruler_file_as_evaluate_py_scores_it(tmp_path, capsys):
    path = _write(tmp_path / "niah_multikey_1.jsonl", [
        {"index": 0, "pred": "The number is 1234567.", "outputs": ["1234567"], "others": {}, "truncation": -1},
        {"index": 1, "pred": "nothing", "outputs": ["7654321"]},
        {"index": 2, "pred": "7 and 8", "outputs": ["7", "9"]},
    ])
    out = json.loads(_run(capsys, "ruler", path, "--task", "niah_multikey_1", "--json"))
    assert out["score"] == 50.0 and out["n"] == 3  # (1 + 0 + 1/2) / 3 = 50
    qa = json.loads(_run(capsys, "ruler", path, "--task", "qa_1", "--json"))  # string_match_part: any reference
    assert qa["score"] == round(200 / 3, 2)


def test_help_lists_every_task_and_unknown_tasks_fail_naming_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in (*LV_DATASETS, *IB_TASKS):
        assert name in text
    path = _write(tmp_path / "p.jsonl", [{"pred": "x", "answers": ["x"]}])
    for bench, task in (("lveval", "hotpotqa"), ("infinitebench", "passkeys"), ("lveval", "factrecall_en_512k")):
        with pytest.raises(SystemExit) as e:
            main([bench, path, "--task", task])
        assert e.value.code != 0
        assert task in capsys.readouterr().err


def test_bad_rows_are_named_by_file_and_line(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", [{"pred": "x", "answers": ["x"]}, {"pred": "y", "answers": "y"}])
    with pytest.raises(SystemExit) as e:
        main(["lveval", path, "--task", "factrecall_en"])
    assert e.value.code == 2 and "p.jsonl:2: field 'answers'" in capsys.readouterr().err
    path = _write(tmp_path / "q.jsonl", [{"prediction": "1", "other": 1}])
    with pytest.raises(SystemExit):
        main(["infinitebench", path, "--task", "passkey"])
    assert "q.jsonl:1: no field 'ground_truth' or 'label'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["infinitebench", str(tmp_path / "missing.jsonl"), "--task", "passkey"])
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    path = _write(tmp_path / "preds_passkey.jsonl", [{"prediction": "71432.", "ground_truth": "71432"}])
    proc = subprocess.run([sys.executable, "-m", "megatron_ultralong.eval.score_cli", "infinitebench", path, "--task",
                           "passkey", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == {"benchmark": "infinitebench", "task": "passkey", "score": 100.0, "n": 1}
