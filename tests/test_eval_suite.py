"""`mu-eval-suite` end to end on a tiny model at small lengths: NIAH + RULER through the registry,
killed with SIGKILL in the middle and re-run: every cell computed exactly once, the results and
the paper-layout table written; plus the suite's routing, aggregates and config errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from eval_helpers import tiny_eval_llama, train_ruler_tokenizer
from megatron_ultralong.eval.grid import BenchCell
from megatron_ultralong.eval.ruler.runner import RulerBenchmark, RulerConfig
from megatron_ultralong.eval.suite.runner import load_suite_config, markdown_table, route

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "ruler")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("suite_model")
    tok = train_ruler_tokenizer()
    tok.save_pretrained(str(d))
    tiny_eval_llama(len(tok)).save_pretrained(str(d))
    return str(d)


def _config(tmp_path) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
model_name: tiny
hf_max_tokens: 4096
benchmarks:
  niah:
    lengths: [200, 300]
    depths: [0.0, 1.0]
    prompt: {{max_new_tokens: 2, haystack: noise}}
  ruler:
    lengths: [1024]
    tasks: [niah_multikey_3, vt, qa_1]
    samples: 2
    inputs: {{squad_json: {os.path.join(FIX, "squad.json")}}}
""")
    return str(path)


def _launch(model_dir, cfg, out):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # logs survive SIGKILL
    return subprocess.Popen([sys.executable, "-m", "megatron_ultralong.eval.suite.cli", "--model", model_dir,
                             "--suite-config", cfg, "--out", str(out), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _computed(log: str) -> list[str]:
    """The cells a run computed, from its progress lines ("[suite] 3/7 ruler length=.../task=vt on hf: ...")."""
    return re.findall(r"\[suite\] \d+/\d+ (\S+ \S+) on hf: score", log)


@pytest.mark.slow
def test_suite_killed_and_resumed_computes_every_cell_once(model_dir, tmp_path):
    cfg, out = _config(tmp_path), tmp_path / "out"
    cells_file = out / "suite" / "ruler_hf_cells.jsonl"
    first = _launch(model_dir, cfg, out)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if cells_file.exists() and len(cells_file.read_text().splitlines()) >= 2:  # header + one RULER cell
            break
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-2000:]
    first.send_signal(signal.SIGKILL)
    log1, _ = first.communicate()
    assert first.returncode == -signal.SIGKILL
    second = _launch(model_dir, cfg, out)
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2[-3000:]
    run1, run2 = _computed(log1), _computed(out2)  # the progress log goes to stdout
    all_keys = [f"niah length={n}/depth={d}" for n in (200, 300) for d in (0.0, 1.0)] + \
               [f"ruler length=1024/task={t}" for t in ("niah_multikey_3", "vt", "qa_1")]
    assert run1 and run2 and "resuming from" in out2
    assert not set(run1) & set(run2)  # nothing computed twice
    saved = [json.loads(x)["cell"] for x in cells_file.read_text().splitlines()[1:]]
    assert len(saved) == len(set(saved)) == 3
    assert sorted(run1 + run2) == sorted(all_keys)  # nothing lost either
    res = json.loads((out / "suite_results.json").read_text())
    assert res["benchmarks"]["ruler"]["cells_done"] == 3 and not res["benchmarks"]["ruler"]["missing"]
    assert (out / "niah_heatmap.png").stat().st_size > 0
    assert len(json.loads((out / "niah_results.json").read_text())["scores"]) == 2  # depths x lengths
    assert set(res["row"]) >= {"NIAH mean", "RULER 1K", "RULER mean"}
    table = (out / "suite_table.md").read_text()
    assert "| **tiny** (this run) |" in table and "| UltraLong-8B-1M (Table 1) | – | – | – | 79.10 |" in table
    assert table in out2
    # RULER's own prediction layout, scorable by RULER's evaluator
    pred = [json.loads(x) for x in (out / "ruler" / "1024" / "vt.jsonl").read_text().splitlines()]
    assert len(pred) == 2 and set(pred[0]) == {"index", "pred", "input", "outputs", "others", "truncation", "length"}


def test_routing_aggregates_and_table():
    assert route(BenchCell("a", 4096, 1), 4096) == "hf" and route(BenchCell("a", 4097, 1), 4096) == "megatron"
    b = RulerBenchmark(RulerConfig(lengths=(4096, 131072, 262144, 524288), tasks=("vt", "qa_1")))
    res = {}
    for n, (vt, qa) in {4096: (100, 80), 131072: (90, 70), 262144: (60, 40), 524288: (50, 10)}.items():
        res[f"length={n}/task=vt"], res[f"length={n}/task=qa_1"] = {"score": vt}, {"score": qa}
    agg = b.aggregate(res)
    # mean over tasks per length, then over lengths up to 128K / 512K
    assert agg["RULER 4K"] == 90 and agg["RULER 128K"] == 80
    assert agg["RULER <128K"] == 85.0 and agg["RULER <512K"] == (90 + 80 + 50 + 30) / 4
    del res["length=524288/task=qa_1"]
    assert "RULER <512K" not in b.aggregate(res) and b.aggregate(res)["RULER <128K"] == 85.0
    t = markdown_table("mine", {"RULER <128K": 85.0})
    assert t.splitlines()[0].startswith("| model | RULER <128K | RULER <512K | RULER <1M |")
    assert "| w/ NTK-aware scaling (Table 3) | 86.91 | 80.27 | 76.62 |" in t and "arXiv 2504.06214" in t


def test_suite_config_errors_name_file_and_key(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("benchmarks: {}\n")
    with pytest.raises(ValueError, match="s.yaml: 'benchmarks' must map"):
        load_suite_config(str(p))
    p.write_text("benchmarks: {ruler: {lengths: [1024]}}\nhf_max: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hf_max'\]"):
        load_suite_config(str(p))
    from megatron_ultralong.eval.suite.registry import make
    with pytest.raises(ValueError, match="benchmarks.lveval2: unknown benchmark"):
        make("lveval2", {})
    with pytest.raises(ValueError, match="benchmarks.ruler: unknown key"):
        make("ruler", {"lengths": [1024], "task": ["vt"]})
    with pytest.raises(ValueError, match=r"--ruler-squad \(inputs.squad_json\): required"):
        make("ruler", {"lengths": [1024], "tasks": ["qa_1"]}).check_inputs()  # the CLI: before any model loads


def test_cost_table_in_docs_is_the_scripts_output():
    """docs/evaluation.md's cost table is what benchmarks/eval_cost.py prints (reproducible), and its
    FLOPs are the project's FLOP model: 2 N s + 2 L d s^2 per prefill (causal), 2 N + 4 L d s per token."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_cost", os.path.join(ROOT, "benchmarks", "eval_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.training.metrics import matmul_params

    cfg = load_model_config("llama3.1-8b")
    s, g, ld = 1 << 20, 128, cfg.num_layers * cfg.num_attention_heads * cfg.head_dim
    n = matmul_params(cfg)
    assert mod.prompt_flops(cfg, s, g) == pytest.approx(2 * n * s + 2 * ld * s * s + g * (2 * n + 4 * ld * s))
    table = mod.markdown(mod.cost_rows(mod.DEFAULT, cfg), 8, 989.0, 0.4)
    assert table in open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8").read()


def test_long_cells_without_a_megatron_model_fail_before_loading(tmp_path, capsys):
    from megatron_ultralong.eval.suite.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("hf_max_tokens: 100\nbenchmarks:\n  niah: {lengths: [200], depths: [0.5]}\n")
    with pytest.raises(SystemExit) as e:
        main(["--model", "/nonexistent", "--suite-config", str(cfg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 cells (e.g. length=200/depth=0.5) exceed hf_max_tokens=100" in err
