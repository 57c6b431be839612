"""mu-prepare-sft: common chat layouts become the JSONL the SFT dataset reads, bad records are named."""
import gzip
import json
import re

import pytest

from megatron_ultralong.data.samples.chat_convert import main
from megatron_ultralong.data.samples.sft import read_chat_jsonl

EXPECTED = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
]


def _write(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_messages_parts_and_sharegpt_become_trainer_rows(tmp_path, capsys):
    hf_chat = _write(tmp_path / "hf.jsonl", [
        {"id": 1, "messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]},
                               {"role": "assistant", "content": "4", "name": "bot"}]}])
    sharegpt = _write(tmp_path / "sharegpt.jsonl.gz", [
        {"conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"}]}], gzip.open)
    out = tmp_path / "sft" / "general_math_code.jsonl"
    assert main([hf_chat, sharegpt, str(out)]) == 0
    assert "2 conversations, 0 skipped" in capsys.readouterr().out
    assert [m for _, m in read_chat_jsonl(str(out))] == EXPECTED  # the SFT dataset's own reader


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "tool", "content": "x"}]}, r"bad\.jsonl:2: messages\[0\]: role 'tool'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}, "not a text part"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": 1}]}]}, "tool_calls"),
    ({"text": "plain"}, "no 'conversations' list"),
])
def test_bad_records_are_named_and_nothing_is_written(tmp_path, capsys, record, match):
    good = {"messages": EXPECTED[1]}
    bad = _write(tmp_path / "bad.jsonl", [good, record])
    out = tmp_path / "out.jsonl"
    assert main([bad, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mu-prepare-sft: error: ") and re.search(match, err), err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    assert main([bad, str(out), "--skip-bad"]) == 0
    assert "1 conversations, 1 skipped" in capsys.readouterr().out
    assert [m for _, m in read_chat_jsonl(str(out))] == [EXPECTED[1]]


def _acemath_parquet(path, rows):
    """A Parquet file in AceMath-Instruct-Training-Data's layout (data/general_sft_stage2.parquet): the
    card's features are `messages` (list of {role: string, content: string}) and `answer` (string)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return str(path)


def test_acemath_instruct_layout_appends_the_answer(tmp_path, capsys):
    src = _acemath_parquet(tmp_path / "general_sft_stage2.parquet", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": "4"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a prime."}], "answer": "7"},
    ])
    out = tmp_path / "sft.jsonl"
    assert main([src, str(out)]) == 0
    rows = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assert rows[0] == EXPECTED[0]
    assert rows[1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                       {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]
    assert [m for _, m in read_chat_jsonl(str(out))] == rows  # what the SFT dataset reads
    assert "2 conversations" in capsys.readouterr().out


def test_acemath_answer_without_a_user_turn_is_named(tmp_path, capsys):
    src = _acemath_parquet(tmp_path / "bad.parquet", [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "answer": "B"}])
    assert main([src, str(tmp_path / "out.jsonl")]) == 2
    assert "bad.parquet:row 0: has an `answer` but messages does not end with a user turn" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
