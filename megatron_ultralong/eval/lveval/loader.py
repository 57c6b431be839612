"""LV-Eval samples from the files of the HF dataset `Infinigence/LVEval`, by path.

The dataset ships one zip per dataset (`https://huggingface.co/datasets/Infinigence/LVEval/
resolve/main/<name>.zip`) holding `<name>/<name>_<level>.jsonl` for the five levels. Under a data
root, `load_samples` finds, in this order: the unzipped `<root>/<name>/<name>_<level>.jsonl`; a
flat `<root>/<name>_<level>.jsonl` (what LV-Eval's own `prediction.py --data-path` reads); the
member of `<root>/<name>.zip`. Each line is one JSON object with (README "Data Format") `input`,
`context`, `answers` (list), `length`, `dataset`, `language`, `answer_keywords` and
`confusing_facts`; only the first four and `answer_keywords` are used.
"""
from __future__ import annotations

import io
import os
import zipfile
from typing import Iterator

from megatron_ultralong.eval.jsonl import read_jsonl
from megatron_ultralong.eval.lveval.prompts import DATASETS, LENGTHS


def locate(root: str, name: str, level: str) -> str:
    """Path of the `<name>_<level>` split under `root` (a zip member as `<zip>::<member>`);
    FileNotFoundError listing the places looked in."""
    if name not in DATASETS:
        raise ValueError(f"unknown LV-Eval dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if level not in LENGTHS:
        raise ValueError(f"unknown LV-Eval length level {level!r}; expected one of {', '.join(LENGTHS)}")
    base = f"{name}_{level}.jsonl"
    candidates = [os.path.join(root, name, base), os.path.join(root, base)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    zpath = os.path.join(root, f"{name}.zip")
    if os.path.isfile(zpath):
        with zipfile.ZipFile(zpath) as z:
            members = [m for m in z.namelist() if m == base or m.endswith("/" + base)]
        if members:
            return f"{zpath}::{sorted(members, key=len)[0]}"
    raise FileNotFoundError(f"LV-Eval {name}_{level}: none of {', '.join(candidates + [zpath])} exists "
                            f"(download {name}.zip from huggingface.co/datasets/Infinigence/LVEval)")


def _lines(path: str) -> Iterator[str]:
    if "::" in path:
        zpath, member = path.split("::", 1)
        with zipfile.ZipFile(zpath) as z, z.open(member) as raw:
            yield from io.TextIOWrapper(raw, encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            yield from f


def check_sample(obj: object, where: str) -> dict:
    """The sample if it has the fields generation and scoring need, else ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("input", "context"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string")
    answers = obj.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings")
    keywords = obj.get("answer_keywords")
    if keywords is not None and not isinstance(keywords, str):
        raise ValueError(f"{where}: field 'answer_keywords' must be a string or absent")
    return obj


def load_samples(root: str, name: str, level: str) -> list[dict]:
    """All samples of `<name>_<level>` under `root`, checked."""
    path = locate(root, name, level)
    samples = [check_sample(obj, where) for where, obj in read_jsonl(path, _lines(path))]
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples
