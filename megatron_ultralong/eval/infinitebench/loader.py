"""InfiniteBench samples from the dataset's JSONL files, by path.

The HF dataset `xinrongzhang2022/InfiniteBench` ships one `<task>.jsonl` per task (upstream's
`scripts/download_dataset.sh` fetches `resolve/main/<task>.jsonl` into one folder). Each line is
one JSON object with `id`, `context`, `input`, `answer` and, for the choice tasks, `options`.
"""
from __future__ import annotations

import os

from megatron_ultralong.eval.infinitebench.prompts import TASKS
from megatron_ultralong.eval.jsonl import read_jsonl_file

_CHOICE = ("longbook_choice_eng", "code_debug")


def check_sample(obj: object, task: str, where: str) -> dict:
    """The sample if it has the fields its task's prompt and scorer need, else ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("context", "input"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string")
    if "answer" not in obj:
        raise ValueError(f"{where}: field 'answer' is missing")
    if task in _CHOICE:
        opts = obj.get("options")
        if not isinstance(opts, list) or len(opts) != 4 or not all(isinstance(o, str) for o in opts):
            raise ValueError(f"{where}: field 'options' must be a list of 4 strings for {task}")
    return obj


def load_samples(root: str, task: str) -> list[dict]:
    """Every sample of `<root>/<task>.jsonl`, checked."""
    if task not in TASKS:
        raise ValueError(f"unknown InfiniteBench task {task!r}; expected one of {', '.join(TASKS)}")
    path = os.path.join(root, f"{task}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"InfiniteBench {task}: {path} does not exist (download {task}.jsonl from "
                                "huggingface.co/datasets/xinrongzhang2022/InfiniteBench)")
    samples = [check_sample(obj, task, where) for where, obj in read_jsonl_file(path)]
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples
