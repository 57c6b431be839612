"""The mu-eval-* command lines on a tiny HF model saved to disk; bad flags give errors naming them."""
import json

import pytest

from eval_helpers import save_tiny_hf
from megatron_ultralong.eval.cli import main


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return save_tiny_hf(str(tmp_path_factory.mktemp("hf")))


def test_niah_cli_writes_results_and_heatmap(hf_dirs, tmp_path, capsys):
    tok_dir, model_dir = hf_dirs
    main(["--model", model_dir, "--tokenizer", tok_dir, "--out", str(tmp_path), "--lengths", "200", "260",
          "--depths", "0", "1", "--max-new-tokens", "3", "--device", "cpu"], command="niah")
    out = capsys.readouterr().out
    assert str(tmp_path / "niah_heatmap.png") in out
    with open(tmp_path / "niah_results.json") as f:
        data = json.load(f)
    assert data["lengths"] == [200, 260] and len(data["samples"]) == 4
    assert all(s["generated_tokens"] <= 3 for s in data["samples"])


def test_ruler_and_ppl_cli(hf_dirs, tmp_path):
    tok_dir, model_dir = hf_dirs
    main(["--model", model_dir, "--tokenizer", tok_dir, "--out", str(tmp_path), "--lengths", "700",
          "--tasks", "vt", "niah_multivalue", "--samples", "1", "--device", "cpu", "--styled"], command="ruler")
    with open(tmp_path / "ruler_results.json") as f:
        assert set(json.load(f)["scores"]) == {"vt", "niah_multivalue"}
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "The grass is green. " * 40}) + "\n")
    main(["--model", model_dir, "--tokenizer", tok_dir, "--out", str(tmp_path), "--documents", str(docs),
          "--seq-len", "100", "--buckets", "4", "--device", "cpu"], command="ppl")
    with open(tmp_path / "ppl_by_position.json") as f:
        assert sum(json.load(f)["tokens"]) == 99


@pytest.mark.parametrize("flags, message", [
    (["--model", "/nonexistent"], "--model='/nonexistent': no such file"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer='/nonexistent/tok'"),
    (["--cp", "2"], "--tp/--cp apply to Megatron checkpoints"),
    (["--lengths", "5"], "context length 5 is too short"),
    (["--depths", "2"], "--depths [2.0]"),
])
def test_bad_flags_exit_2_naming_the_flag(hf_dirs, tmp_path, capsys, flags, message):
    tok_dir, model_dir = hf_dirs
    base = {"--model": model_dir, "--tokenizer": tok_dir, "--out": str(tmp_path), "--lengths": "200",
            "--depths": "0.5", "--device": "cpu"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as e:
        main([x for kv in base.items() for x in kv], command="niah")
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_megatron_checkpoint_paths_are_resolved(tmp_path):
    from megatron_ultralong.eval.megatron_backend import resolve_megatron_checkpoint

    model_dir = tmp_path / "iter_0000010" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "metadata.json").write_text("{}")
    assert resolve_megatron_checkpoint(str(model_dir)) == model_dir
    assert resolve_megatron_checkpoint(str(tmp_path / "iter_0000010")) == model_dir
    assert resolve_megatron_checkpoint(str(tmp_path)) is None  # an HF-style or unrelated directory
    with pytest.raises(ValueError, match="--model='/nonexistent'"):
        resolve_megatron_checkpoint("/nonexistent")


@pytest.mark.parametrize("command", ["niah", "ruler", "ppl"])
def test_help_usage_line_is_the_command_and_every_flag_is_explained(command, capsys):
    from megatron_ultralong.eval.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--help"], command=command)
    assert e.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    # What `mu-eval-<command> --help` prints is typed as is: no hidden subcommand word after the name.
    assert usage.startswith(f"usage: mu-eval-{command} [-h]"), usage
    assert f"mu-eval-{command} {command}" not in usage
    parser = build_parser(command)
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not missing, f"flags without help text: {missing}"
    assert parser.parse_args(["--model", "m", "--out", "o"] + (["--documents", "d", "--seq-len", "8"]
                             if command == "ppl" else ["--lengths", "8"])).command == command


def test_niah_cli_marks_the_trained_length_and_resumes(hf_dirs, tmp_path, capsys):
    tok_dir, model_dir = hf_dirs
    flags = ["--model", model_dir, "--tokenizer", tok_dir, "--out", str(tmp_path), "--lengths", "200", "260",
             "--depths", "0.5", "--device", "cpu", "--trained-length", "230"]
    main(flags, command="niah")
    lines = (tmp_path / "niah_cells.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["header"]["config"]["max_new_tokens"] is None
    main(flags, command="niah")  # resumed: the file is not rewritten or extended
    assert (tmp_path / "niah_cells.jsonl").read_text().splitlines() == lines


def test_ruler_cli_runs_rulers_own_tasks(tmp_path):
    """mu-eval-ruler defaults to RULER's tasks, prompts and scoring; predictions in RULER's layout
    re-score to the same number with RULER's metric."""
    import os

    from eval_helpers import tiny_eval_llama, train_ruler_tokenizer
    from megatron_ultralong.eval.ruler.metrics import score_ruler

    tok = train_ruler_tokenizer()
    model_dir = str(tmp_path / "m")
    tok.save_pretrained(model_dir)
    tiny_eval_llama(len(tok)).save_pretrained(model_dir)
    squad = os.path.join(os.path.dirname(__file__), "fixtures", "ruler", "squad.json")
    out = tmp_path / "out"
    main(["--model", model_dir, "--out", str(out), "--lengths", "1024", "--tasks", "qa_1", "vt",
          "--samples", "2", "--ruler-squad", squad, "--device", "cpu"], command="ruler")
    res = json.loads((out / "ruler_results.json").read_text())
    assert set(res["scores"]) == {"qa_1", "vt"} and "RULER 1K" in res["aggregates"]
    for task in ("qa_1", "vt"):
        lines = [json.loads(x) for x in (out / "ruler" / "1024" / f"{task}.jsonl").read_text().splitlines()]
        assert len(lines) == 2 and all(0 < r["length"] <= 1024 for r in lines)
        assert score_ruler(task, [r["pred"] for r in lines], [r["outputs"] for r in lines]) == res["scores"][task]["1024"]
    with pytest.raises(SystemExit):
        main(["--model", model_dir, "--out", str(out), "--lengths", "1024", "--tasks", "qa_2", "--device", "cpu"],
             command="ruler")
