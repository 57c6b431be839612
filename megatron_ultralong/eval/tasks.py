"""Sample generators: the NIAH passkey and RULER-style synthetic tasks
(github.com/NVIDIA/RULER, scripts/data/synthetic).

Every task turns (length, seed) into a `Sample`: a prompt of exactly `length` tokens, the answers a
correct model must produce, and how to score it. Generation is deterministic in the seed.

Tasks (RULER's templates, keys and values drawn from our own word lists instead of `wonderwords`):
- niah_single:     one needle "One of the special magic numbers for {key} is: {value}."; ask for key.
- niah_multikey:   4 needles with different keys; ask for one (the other 3 are distractors).
- niah_multivalue: 4 needles with the same key and different values; all 4 values are expected.
- niah_multiquery: 4 needles with different keys; ask for all 4 keys, all 4 values are expected.
- vt:              variable tracking in RULER's noise: "VAR A = 12345." then hops "VAR B = VAR A.";
                   every variable that ends up holding the value is expected (1 chain, 4 hops).
RULER's vt has one in-context example; ours has none (it would cost ~10% of a short prompt).

With `split_queries=True`, niah_multiquery asks its 4 keys as 4 separate questions of one shared
context (`Sample.questions`): backends answer them with `generate_many`, prefilling the context
once and forking its KV cache. RULER asks the 4 keys in one question (the default here).

Decoding budgets default to what the answers need (`answer_budget`: their tokens + a margin),
not a fixed count: at 1M tokens every generated token is a pass over the whole KV cache.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ultralong.eval.haystack import Haystack, Prompt
from megatron_ultralong.eval.tokenizer import EvalTokenizer

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
    "lucky", "mellow", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
    "wary", "young", "zesty", "bitter", "clever", "dapper", "early", "fuzzy",
)
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel",
    "umbrella", "valley", "walnut", "yarrow", "zephyr", "beacon", "cobble", "ferry", "glacier", "hammer",
)

# RULER niah templates (scripts/data/synthetic/constants.py), "numbers" as the value type.
NIAH_PREFIX = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_SUFFIX = (
    "\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
    "The special magic numbers for {query} mentioned in the provided text are"
)
VT_PREFIX = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_SUFFIX = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assigned the value {value}, they are:"
)


ANSWER_MARGIN = 6
"""Tokens allowed beyond the answers' own (punctuation, a leading space, separators)."""


def answer_budget(tokenizer: EvalTokenizer, answers: Sequence[str], margin: int = ANSWER_MARGIN) -> int:
    """Greedy decoding budget for answers written after the prompt's answer prefix: the tokens of
    " a1, a2, ..." plus `margin`."""
    return len(tokenizer.encode(" " + ", ".join(answers))) + margin


@dataclass(frozen=True)
class Question:
    """One of several questions asked of the same context (`Sample.questions`)."""

    suffix: tuple[int, ...]
    """Token ids of the question (and answer prefix), appended to the shared context."""

    answers: tuple[str, ...]
    """Strings a correct answer to this question contains."""

    max_new_tokens: int
    """Greedy decoding budget of this question."""


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt with its ground truth."""

    task: str
    """Task name (`RULER_TASKS` or "niah")."""

    prompt: Prompt
    """Token ids of exactly the requested length, plus where each needle is."""

    answers: tuple[str, ...]
    """Strings a correct answer contains (all of them, for the "all" scorer)."""

    max_new_tokens: int
    """Greedy decoding budget."""

    scorer: str = "all"
    """"all", "part" or "exact" (`scoring.score`)."""

    questions: tuple[Question, ...] = ()
    """If set, the prompt's first `context_len` ids are a shared context asked each question in turn
    (one prefill, a forked KV cache per question); `prompt` is the context + the first question."""

    context_len: int = 0
    """Tokens of the shared context when `questions` is set."""


def sample_seed(*parts: object) -> int:
    """A stable 32-bit seed from any parts (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def random_key(rng: random.Random, taken: set[str]) -> str:
    """An unused adjective-noun key, e.g. "quiet-harbor"."""
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random number with exactly `digits` digits (no leading zero)."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _depths(rng: random.Random, n: int) -> list[float]:
    """n needle depths from RULER's 40 evenly spaced depths in [0, 1]."""
    grid = [i / 39 for i in range(40)]
    return [rng.choice(grid) for _ in range(n)]


def _niah(tok: EvalTokenizer, hay: Haystack, length: int, rng: random.Random, task: str,
          snap: bool, split_queries: bool = False) -> Sample:
    taken: set[str] = set()
    n = 1 if task == "niah_single" else 4
    if task == "niah_multivalue":
        key = random_key(rng, taken)
        pairs = [(key, random_number(rng)) for _ in range(n)]
        queried, answers = [key], [v for _, v in pairs]
    else:
        pairs = [(random_key(rng, taken), random_number(rng)) for _ in range(n)]
        if task == "niah_multiquery":
            queried, answers = [k for k, _ in pairs], [v for _, v in pairs]
        else:  # single, multikey: ask for the first key; the rest are distractors
            queried, answers = [pairs[0][0]], [pairs[0][1]]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + " and " + queried[-1]
    needles = [(d, tok.encode(NIAH_NEEDLE.format(key=k, value=v))) for d, (k, v) in zip(_depths(rng, n), pairs)]
    if split_queries and task == "niah_multiquery":
        suffixes = [tok.encode(NIAH_SUFFIX.format(query=k)) for k in queried]
        # The prompt is built with the first question; the context is everything before it.
        prompt = hay.build_prompt(length, needles, tok.encode(NIAH_PREFIX), suffixes[0], snap)
        questions = tuple(Question(tuple(sfx), (a,), answer_budget(tok, (a,))) for sfx, a in zip(suffixes, answers))
        return Sample(task, prompt, tuple(answers), max(q.max_new_tokens for q in questions),
                      questions=questions, context_len=len(prompt.ids) - len(suffixes[0]))
    prompt = hay.build_prompt(
        length, needles, tok.encode(NIAH_PREFIX), tok.encode(NIAH_SUFFIX.format(query=query)), snap
    )
    return Sample(task, prompt, tuple(answers), max_new_tokens=answer_budget(tok, answers))


def _var_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def _vt(tok: EvalTokenizer, hay: Haystack, length: int, rng: random.Random, snap: bool,
        hops: int = 4) -> Sample:
    taken: set[str] = set()
    names = [_var_name(rng, taken) for _ in range(hops + 1)]
    value = random_number(rng, 5)
    statements = [f" VAR {names[0]} = {value}."] + [
        f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)
    ]
    # Sorted depths keep the chain in order: a hop never precedes the variable it reads.
    depths = sorted(_depths(rng, len(statements)))
    needles = [(d, tok.encode(s)) for d, s in zip(depths, statements)]
    suffix = tok.encode(VT_SUFFIX.format(value=value, n=len(names)))
    prompt = hay.build_prompt(length, needles, tok.encode(VT_PREFIX), suffix, snap)
    return Sample("vt", prompt, tuple(names), max_new_tokens=answer_budget(tok, names))


def make_sample(
    task: str,
    tokenizer: EvalTokenizer,
    length: int,
    seed: int,
    haystacks: Optional[dict[str, Haystack]] = None,
    snap_to_sentence: bool = True,
    split_queries: bool = False,
) -> Sample:
    """One sample of a RULER-style task. niah_* use the essay haystack, vt uses RULER's noise.

    haystacks: cache of `Haystack` per kind (filled on first use) so the filler is tokenized once.
    split_queries: niah_multiquery as separate questions of one context (module docstring).
    """
    if task not in RULER_TASKS:
        raise ValueError(f"task={task!r}: expected one of {RULER_TASKS}")
    haystacks = {} if haystacks is None else haystacks
    kind = "noise" if task == "vt" else "essay"
    if kind not in haystacks:
        haystacks[kind] = Haystack(tokenizer, kind)
    rng = random.Random(sample_seed(task, length, seed))
    if task == "vt":
        return _vt(tokenizer, haystacks[kind], length, rng, snap_to_sentence)
    return _niah(tokenizer, haystacks[kind], length, rng, task, snap_to_sentence, split_queries)

