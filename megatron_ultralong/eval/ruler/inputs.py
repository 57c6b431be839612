"""The files RULER's generators read, from paths the user gives (RULER downloads them itself:
`scripts/data/synthetic/json/download_paulgraham_essay.py`, `download_qa_dataset.sh`; its
`english_words.json` ships in the repository; docs/evaluation.md gives the commands).

Everything here is JSON or plain text: nothing read can run code. Each loader reproduces the
corresponding RULER reader and names the file in every error.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class RulerInputs:
    """Paths to RULER's downloaded inputs; only the tasks that need one read it."""

    essay_json: Optional[str] = None
    """PaulGrahamEssays.json ({"text": ...}): the "essay" haystack (niah_single_2/3, multikey_1, ...)."""

    squad_json: Optional[str] = None
    """SQuAD v2.0 dev JSON (dev-v2.0.json, RULER's squad.json): qa_1."""

    hotpotqa_json: Optional[str] = None
    """HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json, RULER's hotpotqa.json): qa_2."""

    english_words_json: Optional[str] = None
    """RULER's scripts/data/synthetic/json/english_words.json ({key: word}): cwe's word pool once a
    prompt needs more distinct words than wonderwords has (long lengths)."""


def _load_json(path: Optional[str], flag: str) -> Any:
    if not path:
        raise ValueError(f"{flag}: required by the selected RULER tasks (docs/evaluation.md says where to get it)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{flag}={path!r}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}={path!r} line {e.lineno}: not valid JSON ({e.msg})") from None


def essay_words(path: Optional[str]) -> list[str]:
    """The essay text split on single spaces after collapsing whitespace, as niah.py does."""
    data = _load_json(path, "--ruler-essays (inputs.essay_json)")
    if not isinstance(data, dict) or not isinstance(data.get("text"), str) or not data["text"].strip():
        raise ValueError(f"--ruler-essays (inputs.essay_json)={path!r}: expected a JSON object with a "
                         "non-empty string 'text'")
    return re.sub(r"\s+", " ", data["text"]).split(" ")


def read_squad(path: Optional[str]) -> tuple[list[dict], list[str]]:
    """(questions, documents) as RULER's qa.py read_squad: answerable questions only, documents
    de-duplicated and sorted, each question's other paragraphs of the same article as `more_context`."""
    data = _load_json(path, "--ruler-squad (inputs.squad_json)")
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            more = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        qas.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                    "context": [index[p["context"]]],
                                    "more_context": [i for i in more if i != index[p["context"]]]})
    except (KeyError, TypeError) as e:
        raise ValueError(f"--ruler-squad (inputs.squad_json)={path!r}: not the SQuAD v2 layout (missing {e})") from None
    if not qas:
        raise ValueError(f"--ruler-squad (inputs.squad_json)={path!r}: no answerable questions")
    return qas, docs


def read_hotpotqa(path: Optional[str]) -> tuple[list[dict], list[str]]:
    """(questions, documents) as RULER's qa.py read_hotpotqa: a document is "title\\n" + its joined
    sentences; every question's ten paragraphs (gold and distractors) are its context."""
    data = _load_json(path, "--ruler-hotpotqa (inputs.hotpotqa_json)")
    try:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        qas = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--ruler-hotpotqa (inputs.hotpotqa_json)={path!r}: not the HotpotQA dev distractor "
                         f"layout ({e})") from None
    if not qas:
        raise ValueError(f"--ruler-hotpotqa (inputs.hotpotqa_json)={path!r}: no questions")
    return qas, docs


def english_words(path: Optional[str]) -> list[str]:
    """The values of RULER's english_words.json, in file order."""
    data = _load_json(path, "--ruler-english-words (inputs.english_words_json)")
    if not isinstance(data, dict) or not all(isinstance(w, str) for w in data.values()):
        raise ValueError(f"--ruler-english-words (inputs.english_words_json)={path!r}: expected a JSON object "
                         "mapping keys to words")
    return list(data.values())


def wonderwords_lists() -> dict[str, list[str]]:
    """The noun, adjective and verb lists RULER takes from the `wonderwords` package (MIT; read as
    package data text files, the way `wonderwords.random_word._get_words_from_text_file` reads them)."""
    try:
        from importlib.resources import files

        assets = files("wonderwords.assets")
    except ModuleNotFoundError:
        raise ValueError("RULER's word lists come from the `wonderwords` package: pip install "
                         "'megatron-ultralong[ruler]'") from None
    return {name: [w.rstrip() for w in assets.joinpath(f"{name}list.txt").read_text(encoding="utf-8")
                   .splitlines(keepends=True)] for name in ("noun", "adjective", "verb")}


def sentence_splitter() -> Callable[[str], list[str]]:
    """nltk's `sent_tokenize` (English Punkt), which RULER splits essays with before inserting needles."""
    try:
        import nltk
        from nltk.tokenize import sent_tokenize
    except ModuleNotFoundError:
        raise ValueError("RULER's essay haystack is split with nltk: pip install 'megatron-ultralong[ruler]'") \
            from None
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        raise ValueError("nltk's punkt_tab data is missing (RULER splits essays into sentences with it): "
                         "python -m nltk.downloader punkt_tab, or set NLTK_DATA") from None
    return sent_tokenize


def file_identity(path: Optional[str]) -> Optional[dict]:
    """Size and mtime of an input file, recorded in a grid's header so changed inputs start afresh."""
    if not path:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
