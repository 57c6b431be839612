"""`mu-prepare-sft`: common chat-dataset layouts -> the SFT JSONL the trainer reads (data.kind=sft).

The trainer's format (megatron_ultralong/data/samples/chat.py, `validate_messages`) is one JSON
object per line with a `messages` list of {"role": system|user|assistant, "content": str}:

    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}

Accepted here, per record (JSONL, .jsonl.gz, or Parquet with pyarrow):
  - `messages` (OpenAI / Hugging Face chat layout), content a string or a list of parts
    [{"type": "text", "text": ...}] (text parts are joined; any other part type is refused);
  - `conversations` with {"from": human|gpt|system, "value": ...} (ShareGPT layout);
  - `messages` + `answer` (AceMath-Instruct-Training-Data, whose `general_sft_stage2` split is the
    UltraLong SFT source: https://huggingface.co/datasets/nvidia/AceMath-Instruct-Training-Data,
    files data/<split>.parquet, features `messages` [{role, content}] and `answer` string): the
    messages are the prompt (ending with a user turn) and `answer` is the assistant's reply, which
    becomes the conversation's last message;
  - role spellings human/user, gpt/assistant/bot/model, system; other message keys (name,
    weight, ...) are dropped. Tool calls and tool turns have no place in Llama-3.1's plain chat
    format and are refused, not silently flattened.

Every converted record goes through `validate_messages`, so what this tool writes, training reads.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from typing import Any, Iterator, Optional, Sequence

from megatron_ultralong.data.samples.chat import validate_messages

ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
}


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: content part {k} is not a text part ({part!r:.60})")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: content is {type(value).__name__}, expected a string or a list of text parts")


def normalize_record(record: Any, where: str, field: Optional[str] = None) -> dict:
    """One dataset record -> {"messages": [...]} in the trainer's format (ValueError names `where`).

    field: the key holding the conversation (default: "messages", else "conversations")."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    key = field or ("messages" if "messages" in record else "conversations")
    turns = record.get(key)
    if not isinstance(turns, list):
        raise ValueError(f"{where}: no {key!r} list (use --field to name the conversation column)")
    messages = []
    for k, turn in enumerate(turns):
        at = f"{where}: {key}[{k}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{at} is not an object")
        if turn.get("tool_calls"):
            raise ValueError(f"{at} has tool_calls, which the Llama-3.1 chat format used here cannot render")
        role = turn.get("role", turn.get("from"))
        if role not in ROLE_ALIASES:
            raise ValueError(f"{at}: role {role!r} is not one of {sorted(ROLE_ALIASES)}")
        content = turn.get("content", turn.get("value"))
        messages.append({"role": ROLE_ALIASES[role], "content": _content(content, at)})
    if "answer" in record and key == "messages":  # AceMath-Instruct layout: the reply is a column of its own
        answer = record["answer"]
        if not isinstance(answer, str):
            raise ValueError(f"{where}: answer is {type(answer).__name__}, expected a string")
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"{where}: has an `answer` but {key} does not end with a user turn to answer")
        messages.append({"role": "assistant", "content": answer})
    return {"messages": validate_messages({"messages": messages}, where)}


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs: `file:line` for JSONL, `file:row` for Parquet."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'megatron-ultralong[data]')") from None
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}")


def convert(inputs: Sequence[str], output: str, field: Optional[str] = None, skip_bad: bool = False) -> dict:
    """Convert `inputs` into `output` (written atomically). Returns {"written": n, "skipped": m}.
    Without skip_bad the first bad record raises ValueError and nothing is written."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.partial")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    written = skipped = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for path in inputs:
                if not os.path.isfile(path):
                    raise ValueError(f"{path}: no such file")
                for where, record in read_records(path):
                    try:
                        if isinstance(record, ValueError):
                            raise record
                        out.write(json.dumps(normalize_record(record, where, field), ensure_ascii=False) + "\n")
                        written += 1
                    except ValueError:
                        if not skip_bad:
                            raise
                        skipped += 1
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"written": written, "skipped": skipped}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="mu-prepare-sft", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert chat datasets (`messages` role/content, `messages` + `answer` as in AceMath-Instruct, "
                    "or ShareGPT `conversations`) into the SFT JSONL of data.kind=sft.", epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL, JSONL.gz or Parquet files")
    p.add_argument("output", metavar="OUTPUT", help="the SFT JSONL to write (atomically)")
    p.add_argument("--field", help="the record key holding the conversation (default: messages, else conversations)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of stopping")
    args = p.parse_args(argv)
    try:
        counts = convert(args.inputs, args.output, args.field, args.skip_bad)
    except ValueError as e:
        print(f"mu-prepare-sft: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {counts['written']} conversations, {counts['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
