"""LV-Eval and InfiniteBench as suite benchmarks: a tiny-model `mu-eval-suite` run of NIAH + RULER
+ LV-Eval + InfiniteBench on small fixtures in the datasets' own file layouts; the paper's columns
in the table; a re-run computes nothing; the prediction files, re-scored by `mu-eval-score`, give
the suite's numbers; missing data is a one-line error with its download command."""
import json
import os
import re

import pytest

from eval_helpers import tiny_eval_llama, train_ruler_tokenizer
from megatron_ultralong.eval.infinitebench.prompts import TASKS as IB_TASKS
from megatron_ultralong.eval.lveval.prompts import DATASETS, LENGTHS
from megatron_ultralong.eval.score_cli import main as score_main
from megatron_ultralong.eval.suite.registry import make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _lveval_data(root):
    """Every dataset at every level in the unzipped layout `<name>/<name>_<level>.jsonl`; one file
    with 3 samples so that it spans two cells of 2."""
    for name in DATASETS:
        zh = name.endswith("zh") or name in ("cmrc_mixup", "lic_mixup", "dureader_mixup")
        for level in LENGTHS:
            n = 3 if (name, level) == ("factrecall_en", "16k") else 1
            rows = []
            for i in range(n):
                ans = "北京" if zh else f"paris {i}"
                ctx = ("北京是首都。" * 6) if zh else f"The city is paris {i}. " * 6
                rows.append({"input": "哪里？" if zh else "Which city?", "context": ctx, "answers": [ans],
                             "length": len(ctx), "dataset": f"{name}_{level}", "language": "zh" if zh else "en",
                             "answer_keywords": ans, "confusing_facts": []})
            _write(os.path.join(root, name, f"{name}_{level}.jsonl"), rows)


def _ib_sample(task: str, i: int) -> dict:
    ctx = "noise " * 20 + f"The pass key is {40 + i}. " + "noise " * 20
    eg = {"id": i, "context": ctx, "input": "What is the pass key?", "answer": [str(40 + i)], "options": []}
    if task == "code_run":
        eg.update(input="What is the value of func_3(-7)?", answer=[12])
    elif task == "math_find":
        eg.update(input="What is The largest number of the list?", answer=[7], context="1, 7, 3")
    elif task == "math_calc":
        eg.update(input="", answer=[1, 2], context="1 + 1")
    elif task in ("code_debug", "longbook_choice_eng"):
        eg.update(options=["alpha", "beta", "gamma", "delta"], answer=["beta"])
    elif task == "longbook_sum_eng":
        eg.update(answer=["a short summary of the pass key"])
    elif task == "longbook_qa_chn":
        eg.update(answer=["北京"], context="北京是首都。" * 5, input="哪里？")
    elif task == "longdialogue_qa_eng":
        eg.update(answer=["ALICE"], context="ALICE: hi. BOB: $$MASK$$ said hi.")
    return eg


def _ib_data(root):
    for task in IB_TASKS:
        _write(os.path.join(root, f"{task}.jsonl"), [_ib_sample(task, i) for i in range(2 if task == "passkey" else 1)])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite_files_model")
    tok = train_ruler_tokenizer()
    tok.save_pretrained(str(d))
    tiny_eval_llama(len(tok)).save_pretrained(str(d))
    return str(d)


def _config(tmp_path, lv, ib) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
model_name: tiny
hf_max_tokens: 4096
benchmarks:
  niah: {{lengths: [200], depths: [0.5], prompt: {{max_new_tokens: 2, haystack: noise}}}}
  ruler: {{lengths: [1024], tasks: [vt], samples: 1}}
  lveval: {{data_root: {lv}, chunk: 2, max_new_tokens: 8}}
  infinitebench: {{data_root: {ib}, chunk: 1, max_new_tokens: 8, truncate_tokens: null}}
""")
    return str(path)


def _run(capsys, model_dir, cfg, out) -> str:
    """mu-eval-suite in this process (its imports are paid once); returns what it printed."""
    from megatron_ultralong.eval.suite.cli import main

    main(["--model", model_dir, "--suite-config", cfg, "--out", str(out), "--device", "cpu"])
    return capsys.readouterr().out


def _score(capsys, *argv) -> float:
    score_main(list(argv) + ["--json"])
    return json.loads(capsys.readouterr().out)["score"]


def test_suite_with_all_four_benchmarks_resumes_and_writes_rescorable_predictions(model_dir, tmp_path, capsys):
    lv, ib, out = tmp_path / "lveval", tmp_path / "ib", tmp_path / "out"
    _lveval_data(str(lv))
    _ib_data(str(ib))
    cfg = _config(tmp_path, lv, ib)
    log1 = _run(capsys, model_dir, cfg, out)
    computed = re.findall(r"\[suite\] \d+/(\d+) (\S+) (\S+) on hf", log1)
    n_lv, n_ib = len(DATASETS) * len(LENGTHS) + 1, len(IB_TASKS) + 1  # + the second chunk / sample
    assert len(computed) == int(computed[0][0]) == 1 + 1 + n_lv + n_ib
    assert "dataset=factrecall_en/level=16k/samples=2-3" in {k for _, _, k in computed}
    res = json.loads((out / "suite_results.json").read_text())
    row = res["row"]
    assert {"NIAH mean", "RULER 1K", "LV-Eval 16k", "LV-Eval <128K", "LV-Eval <256K", "InfiniteBench"} <= set(row)
    table = (out / "suite_table.md").read_text()
    head = table.splitlines()[0]
    assert "| LV-Eval <128K | LV-Eval <256K | InfiniteBench |" in head
    assert f"| {row['InfiniteBench']:.2f} |" in table.splitlines()[2]

    # as if killed before the last LV-Eval and InfiniteBench chunks were saved: the re-run with the
    # same --out computes exactly those two cells, nothing else, and writes the same table
    lost = []
    for name in ("lveval", "infinitebench"):
        cells_file = out / "suite" / f"{name}_hf_cells.jsonl"
        lines = cells_file.read_text().splitlines(keepends=True)
        lost.append((name, json.loads(lines[-1])["cell"]))
        cells_file.write_text("".join(lines[:-1]))
    log2 = _run(capsys, model_dir, cfg, out)
    assert [(b, k) for _, b, k in re.findall(r"\[suite\] \d+/(\d+) (\S+) (\S+) on hf", log2)] == lost
    assert "resuming from" in log2 and (out / "suite_table.md").read_text() == table

    # LV-Eval's layout, re-scored by mu-eval-score as evaluation.py would: the suite's per-file scores
    lv_res = json.loads((out / "lveval_results.json").read_text())
    three = [json.loads(x) for x in (out / "lveval" / "factrecall_en_16k.jsonl").read_text().splitlines()]
    assert len(three) == 3 and set(three[0]) == {"pred", "answers", "gold_ans", "input", "all_classes", "length"}
    for name, level in (("factrecall_en", "16k"), ("dureader_mixup", "256k"), ("hotpotwikiqa_mixup", "32k")):
        path = str(out / "lveval" / f"{name}_{level}.jsonl")
        assert _score(capsys, "lveval", path, "--task", f"{name}_{level}") == lv_res["scores"][name][level]
    per_level = [sum(lv_res["scores"][d][lvl] for d in DATASETS) / len(DATASETS) for lvl in LENGTHS]
    assert row["LV-Eval <128K"] == round(sum(per_level[:4]) / 4, 2)
    assert row["LV-Eval <256K"] == round(sum(per_level) / 5, 2)

    # InfiniteBench's layout, re-scored as compute_scores.py would (x 100); ids run over the chunks
    ib_res = json.loads((out / "infinitebench_results.json").read_text())
    rows = [json.loads(x) for x in (out / "infinitebench" / "preds_passkey.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and set(rows[0]) == {"id", "prediction", "ground_truth"}
    for task in IB_TASKS:
        path = str(out / "infinitebench" / f"preds_{task}.jsonl")
        assert _score(capsys, "infinitebench", path, "--task", task) == pytest.approx(ib_res["scores"][task])
    assert row["InfiniteBench"] == round(sum(ib_res["scores"].values()) / 12, 2)


def test_missing_data_is_a_one_line_error_with_the_download_command(tmp_path):
    lv = make("lveval", {"data_root": str(tmp_path), "datasets": ["cmrc_mixup"], "levels": ["64k"]})
    with pytest.raises(ValueError) as e:
        lv.check_inputs()
    msg = str(e.value)
    assert "\n" not in msg and "cmrc_mixup_64k.jsonl not found" in msg
    assert "https://huggingface.co/datasets/Infinigence/LVEval/resolve/main/cmrc_mixup.zip" in msg
    ib = make("infinitebench", {"data_root": str(tmp_path), "tasks": ["code_run"]})
    with pytest.raises(ValueError, match=r"code_run.jsonl not found .*InfiniteBench/resolve/main/code_run.jsonl"):
        ib.check_inputs()
    _write(str(tmp_path / "code_run.jsonl"), [dict(_ib_sample("code_run", 0), input="no call here")])
    with pytest.raises(ValueError, match=r"code_run.jsonl: sample 0: code_run input names no call"):
        make("infinitebench", {"data_root": str(tmp_path), "tasks": ["code_run"]}).check_inputs()
    with pytest.raises(ValueError, match="benchmarks.lveval.levels"):
        make("lveval", {"data_root": str(tmp_path), "levels": ["512k"]})
    with pytest.raises(ValueError, match=r"benchmarks.lveval.max_length=1: expected >= 2"):
        make("lveval", {"data_root": str(tmp_path), "max_length": 1})
    with pytest.raises(ValueError, match=r"benchmarks.infinitebench: unknown key"):
        make("infinitebench", {"data_root": str(tmp_path), "task": ["passkey"]})


def test_cells_chunk_files_route_by_length_and_header_fingerprints_the_data(tmp_path):
    _write(str(tmp_path / "passkey.jsonl"), [_ib_sample("passkey", i) for i in range(5)]
           + [dict(_ib_sample("passkey", 5), context="x" * 30000)])
    b = make("infinitebench", {"data_root": str(tmp_path), "tasks": ["passkey"], "chunk": 4})
    cells = b.cells()
    assert [c.key for c in cells] == ["task=passkey/samples=0-4", "task=passkey/samples=4-6"]
    assert [c.num_prompts for c in cells] == [4, 2] and cells[0].new_tokens == 6
    assert cells[0].prompt_tokens < 200 and cells[1].prompt_tokens > 10000  # the long sample's chunk
    capped = make("infinitebench", {"data_root": str(tmp_path), "tasks": ["passkey"], "truncate_tokens": 4096})
    assert max(c.prompt_tokens for c in capped.cells()) == 4096 + 6
    head = b.header()
    assert head["files"]["passkey"]["size"] == os.path.getsize(tmp_path / "passkey.jsonl")
    os.utime(tmp_path / "passkey.jsonl", ns=(1, 1))  # a changed file changes the header: no reuse
    assert make("infinitebench", {"data_root": str(tmp_path), "tasks": ["passkey"], "chunk": 4}).header() != head


def test_aggregates_only_from_complete_files():
    b = make("infinitebench", {"data_root": "unused", "tasks": list(IB_TASKS)})
    b.cells = lambda: [type("C", (), {"key": f"task={t}/samples=0-2"})() for t in IB_TASKS]
    res = {f"task={t}/samples=0-2": {"values": [1.0, 0.0] if t == "passkey" else [1.0, 1.0]} for t in IB_TASKS}
    assert b.aggregate(res) == {"InfiniteBench": round((50 + 1100) / 12, 2)}
    del res["task=code_run/samples=0-2"]
    assert b.aggregate(res) == {}  # 11 of 12 tasks: no paper column


def test_example_suite_config_builds_every_benchmark():
    """examples/eval/suite_1m.yaml, the docs' example, is a valid suite config for all four benchmarks."""
    from megatron_ultralong.eval.suite.runner import load_suite_config

    cfg = load_suite_config(os.path.join(ROOT, "examples", "eval", "suite_1m.yaml"))
    benches = {n: make(n, o) for n, o in cfg.benchmarks.items()}
    assert list(benches) == ["niah", "ruler", "lveval", "infinitebench"]
    assert len(benches["lveval"].nominal_cells()) == 55 and len(benches["infinitebench"].nominal_cells()) == 12
    assert sum(c.num_prompts for c in benches["lveval"].nominal_cells()) == 8645  # LV-Eval's 1729 per level
