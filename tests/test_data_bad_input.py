"""Bad input: by default the first bad record fails the build naming file and line; with
skip_bad every bad record is skipped and counted by reason. Nothing is dropped silently."""
from __future__ import annotations

import json
import os

import pytest
from data_helpers import corpus_records, make_recipe

from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.cli import main as cli_main
from megatron_ultralong.data.preprocess.readers import BadInputError

GOOD = [json.dumps(r, ensure_ascii=False).encode() for r in corpus_records(6, seed=8)]

# (raw line, reason); each is placed as line 4 of a file of good lines.
CASES = [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'["a", "list"]', "malformed JSON"),
    (b'{"domain": "web"}', "missing field"),
    (b'{"text": 42, "domain": "web"}', "missing field"),
    (b'{"text": "no domain here"}', "missing field"),
    (b'{"text": "caf\xe9 latin-1 bytes", "domain": "web"}', "non-UTF-8"),
    (b'{"text": "lone \\ud800 surrogate", "domain": "web"}', "non-UTF-8"),
    (b'{"text": "", "domain": "web"}', "empty text"),
    (b'{"text": "  \\n\\t ", "domain": "web"}', "empty text"),
    (b'{"text": "fine text", "domain": "poetry"}', "unknown domain"),
    (b'{"text": "fine text", "domain": 5}', "bad domain"),
    (b'{"text": "fine text", "domain": NaN}', "bad domain"),
    (b'{"text": "fine text", "domain": {"a": 1}}', "bad domain"),
]
DOMAINS = {"domains": {"web": {}, "code": {}, "books": {}}}


def _file(tmp_path, bad_line: bytes, name: str = "in.jsonl") -> str:
    lines = GOOD[:3] + [bad_line] + GOOD[3:] + [b""]  # trailing blank line: counted, not an error
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("line, reason", CASES, ids=[f"{r}-{i}" for i, (_, r) in enumerate(CASES)])
def test_bad_record_fails_naming_file_and_line(tmp_path, line, reason):
    path = _file(tmp_path, line)
    with pytest.raises(BadInputError) as err:
        build_dataset(make_recipe([path], str(tmp_path / "ds"), upsampling=DOMAINS), progress=False)
    assert f"{path}:4: {reason}" in str(err.value)
    assert "--skip-bad" in str(err.value)
    assert not (tmp_path / "ds.bin").exists() and not (tmp_path / "ds.idx").exists()


def test_skip_bad_counts_every_reason(tmp_path):
    paths = [_file(tmp_path, line, f"in{i}.jsonl") for i, (line, _) in enumerate(CASES)]
    report = build_dataset(make_recipe(paths, str(tmp_path / "ds"), upsampling=DOMAINS,
                                       skip_bad=True), progress=False)
    expected = {"blank line": len(CASES)}  # each file's trailing blank line, listed not fatal
    for _, reason in CASES:
        expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped"]["by_reason"] == expected
    assert report["skipped"]["total"] == 2 * len(CASES)
    assert report["input"]["documents"] == len(CASES) * len(GOOD)
    assert report["input"]["records"] == len(CASES) * (len(GOOD) + 1)
    assert report["input"]["blank_lines"] == len(CASES)
    assert report["output"]["documents"] == len(CASES) * len(GOOD)
    assert any(e.startswith(paths[0] + ":4: malformed JSON") for e in report["skipped"]["examples"])
    md = (tmp_path / "ds.stats.md").read_text()
    assert "unknown domain: 1" in md and "empty text: 2" in md


def test_parquet_bad_rows_are_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ok text", None, "more text", ""],
                             "domain": ["web", "web", None, "web"]}), tmp_path / "p.parquet")
    path = str(tmp_path / "p.parquet")
    with pytest.raises(BadInputError, match=f"{path}:row 2: missing field"):
        build_dataset(make_recipe([path], str(tmp_path / "ds")), progress=False)
    report = build_dataset(make_recipe([path], str(tmp_path / "ds"), skip_bad=True), progress=False)
    assert report["skipped"]["by_reason"] == {"missing field": 2, "empty text": 1}
    assert report["output"]["documents"] == 1


def test_cli_reports_bad_input_and_exits_nonzero(tmp_path, capsys):
    path = _file(tmp_path, CASES[0][0])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"inputs": [path], "tokenizer": {"path": make_recipe(
        [path], "x").tokenizer.path, "fast_path": "off"}, "output": {"prefix": str(tmp_path / "ds")},
        "workers": 0}))
    assert cli_main(["--config", str(recipe), "--no-progress"]) == 2
    assert f"{path}:4: malformed JSON" in capsys.readouterr().err
    assert cli_main(["--config", str(recipe), "--no-progress", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 record(s) and 1 blank line(s)" in out and "tokenizer backend: hf" in out
    assert (tmp_path / "ds.idx").exists()


def test_nested_domain_field(tmp_path):
    records = [{"text": r["text"], "meta": {"set": r["domain"]}} for r in corpus_records(6, seed=8)]
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = build_dataset(make_recipe([str(path)], str(tmp_path / "ds"), domain_field="meta.set"),
                           progress=False)
    assert sum(report["source"][d]["docs"] for d in report["source"] if d != "_all") == 6
    assert set(report["source"]) - {"_all"} == {r["meta"]["set"] for r in records}


def _cli_error(tmp_path, capsys, inputs, *overrides) -> str:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"inputs": inputs, "tokenizer": {"path": make_recipe(
        inputs, "x").tokenizer.path, "fast_path": "off"}, "output": {"prefix": str(tmp_path / "ds")},
        "workers": 0}))
    assert cli_main(["--config", str(recipe), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ds.") or n.startswith(".ds.")]
    return err[0]


def test_budget_that_keeps_nothing_is_an_error(tmp_path, capsys):
    path = _file(tmp_path, GOOD[0])
    err = _cli_error(tmp_path, capsys, [path], "upsampling.total_tokens=1")
    assert "upsampling.total_tokens=1" in err and "keeps no document" in err


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_non_finite_long_factor_names_the_field(tmp_path, capsys, value):
    path = _file(tmp_path, GOOD[0])
    err = _cli_error(tmp_path, capsys, [path], f"upsampling.long_factor={value}")
    assert "upsampling.long_factor=" in err and "finite" in err


def test_directory_input_says_it_is_a_directory(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    err = _cli_error(tmp_path, capsys, [str(tmp_path / "shards")])
    assert "is a directory" in err and "shards" in err
    err = _cli_error(tmp_path, capsys, [str(tmp_path / "shard*")])
    assert "matches only directories" in err
