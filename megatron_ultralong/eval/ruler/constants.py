"""RULER's 13 tasks as RULER defines them (github.com/NVIDIA/RULER, `scripts/synthetic.yaml` for the
task arguments, `scripts/data/synthetic/constants.py` for templates, answer prefixes and
`tokens_to_generate`). Text copied verbatim, typos included: the prompts are the benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BaseTask = Literal["niah", "variable_tracking", "common_words_extraction", "freq_words_extraction", "qa"]
HaystackType = Literal["noise", "essay", "needle"]
NeedleType = Literal["words", "numbers", "uuids"]


@dataclass(frozen=True)
class BaseTaskSpec:
    """One of RULER's five task families (`scripts/data/synthetic/constants.py` TASKS)."""

    tokens_to_generate: int
    """Generation budget; also reserved inside the length when fitting the prompt."""

    template: str
    """Task template with {context} and {query} (plus {type_needle_v} / {num_v})."""

    answer_prefix: str
    """Appended to the template; the model continues from it."""


BASE_TASKS: dict[str, BaseTaskSpec] = {
    "niah": BaseTaskSpec(
        128,
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
        "{type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": BaseTaskSpec(
        30,
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: "),
    "common_words_extraction": BaseTaskSpec(
        120,
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": BaseTaskSpec(
        50,
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
        "the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": BaseTaskSpec(
        32,
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:"),
}


@dataclass(frozen=True)
class RulerTask:
    """One row of RULER's `scripts/synthetic.yaml`."""

    name: str
    """RULER's task name (niah_single_1, ..., qa_2)."""

    base: BaseTask
    """The family whose generator, template and metric it uses."""

    args: dict = field(default_factory=dict)
    """The generator arguments synthetic.yaml gives (type_haystack, num_needle_k, ...)."""

    @property
    def spec(self) -> BaseTaskSpec:
        return BASE_TASKS[self.base]


def _niah(name: str, haystack: HaystackType, k_type: NeedleType, v_type: NeedleType, k: int = 1, v: int = 1,
          q: int = 1) -> RulerTask:
    return RulerTask(name, "niah", {"type_haystack": haystack, "type_needle_k": k_type, "type_needle_v": v_type,
                                    "num_needle_k": k, "num_needle_v": v, "num_needle_q": q})


TASKS: dict[str, RulerTask] = {t.name: t for t in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", q=4),
    RulerTask("vt", "variable_tracking", {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}),
    RulerTask("cwe", "common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    RulerTask("fwe", "freq_words_extraction", {"alpha": 2.0}),
    RulerTask("qa_1", "qa", {"dataset": "squad"}),
    RulerTask("qa_2", "qa", {"dataset": "hotpotqa"}),
)}
"""The 13 tasks in RULER's order (`scripts/config_tasks.sh`)."""

# Haystack sentence of the "noise" type (niah.py, variable_tracking.py).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Needle sentence (niah.py); also the haystack of the "needle" type.
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# Document layout of the QA context (qa.py).
DOCUMENT_PROMPT = "Document {i}:\n{document}"
