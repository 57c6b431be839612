"""RULER's sample generators (github.com/NVIDIA/RULER `scripts/data/synthetic/{niah,
variable_tracking,common_words_extraction,freq_words_extraction,qa}.py`), re-implemented.

Same haystacks, needles, insertion rules, few-shot examples and length fitting: a sample's
prompt (input + answer prefix) plus `tokens_to_generate` fits within the length, counted in the
model's tokens without special tokens (RULER's `tokenizer.tokenize`). The fitting is RULER's: a
binary search for the largest haystack that fits (niah, vt, cwe, qa; from a probe's tokens per
unit), then per sample the haystack shrinks by RULER's increment until it fits; fwe grows its word
count by length/32 until the text reaches the length. Random draws follow RULER's order from one
`random.Random(seed)` per (task, length) cell, including RULER's fixed-seed shuffles
(`random.Random(seed).shuffle`), so a cell is reproducible by itself; draws RULER takes from
numpy's global generator come from the same stream. The model template is RULER's "base" (none).
"""
from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from megatron_ultralong.eval.ruler import inputs as rin
from megatron_ultralong.eval.ruler.constants import DOCUMENT_PROMPT, NEEDLE, NOISE, TASKS, RulerTask

CountTokens = Callable[[str], int]
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]  # niah.py


@dataclass(frozen=True)
class RulerSample:
    """One line of RULER's generated `validation.jsonl`."""

    index: int
    input: str
    """Prompt without the answer prefix (RULER's `input`)."""
    outputs: list
    """Expected strings (RULER's `outputs`)."""
    length: int
    """Prompt tokens (answer prefix included) + tokens_to_generate."""
    answer_prefix: str

    @property
    def prompt(self) -> str:
        """What the model is given: input + answer prefix (RULER's call_api.py)."""
        return self.input + self.answer_prefix


class Resources:
    """Inputs loaded once per run and shared by the cells that need them."""

    def __init__(self, paths: rin.RulerInputs):
        self.paths = paths
        self._cache: dict = {}

    def get(self, name: str):
        if name not in self._cache:
            p = self.paths
            self._cache[name] = {
                "essay": lambda: rin.essay_words(p.essay_json),
                "squad": lambda: rin.read_squad(p.squad_json),
                "hotpotqa": lambda: rin.read_hotpotqa(p.hotpotqa_json),
                "english_words": lambda: rin.english_words(p.english_words_json),
                "wonderwords": rin.wonderwords_lists,
                # niah.py's key pool: every adjective-noun pair, sorted (~6M strings, built once)
                "niah_words": lambda: sorted({f"{a}-{n}" for a in self.get("wonderwords")["adjective"]
                                              for n in self.get("wonderwords")["noun"]}),
                "sent_tokenize": rin.sentence_splitter,
            }[name]()
        return self._cache[name]


def zeta(s: float) -> float:
    """Riemann zeta for s > 1 (what RULER takes from scipy.special.zeta): the first 1000 terms plus
    the Euler-Maclaurin tail, accurate to ~1e-15 for fwe's alpha=2; written here to spare a scipy
    dependency for one constant."""
    n = 1000
    head = math.fsum(k ** -s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12


def _search(make: Callable[[int], str], count: CountTokens, budget: int, reserve: int, incremental: int,
            probe: int, factor: int, floor_div: bool = False) -> int:
    """RULER's binary search: the largest haystack size whose prompt + `reserve` fits `budget`."""
    tokens_per = count(make(probe)) / probe
    est = int(budget // tokens_per) * factor if floor_div else int((budget / tokens_per) * factor)
    lo, hi, best = incremental, max(est, incremental * 2), None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count(make(mid)) + reserve <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best if best is not None else incremental


def _fit(make: Callable[[int], tuple[str, list]], count: CountTokens, size: int, incremental: int,
         reserve: int, budget: int, task: str) -> tuple[str, list, int]:
    """RULER's per-sample loop: shrink by `incremental` until prompt + reserve fits. RULER loops
    forever once it cannot shrink further; this raises instead."""
    while True:
        text, answer = make(size)
        length = count(text) + reserve
        if length <= budget:
            return text, answer, length
        if size <= incremental:
            raise ValueError(f"RULER {task}: even the smallest haystack needs {length} tokens > length {budget}")
        size -= incremental


def _split_prefix(text: str, prefix_template: str) -> tuple[str, str]:
    """RULER locates the answer prefix by the last occurrence of its first 10 characters."""
    i = text.rfind(prefix_template[:10])
    return text[:i], text[i:]


class _Gen:
    def __init__(self, task: RulerTask, length: int, count: CountTokens, res: Resources, seed: int):
        self.task, self.length, self.count, self.res, self.seed = task, length, count, res, seed
        self.a = task.args
        self.rng = random.Random(seed)
        self.template = task.spec.template + task.spec.answer_prefix  # model template "base"
        self.ttg = task.spec.tokens_to_generate


class _Niah(_Gen):
    def __init__(self, *args):
        super().__init__(*args)
        a = self.a
        self.num_k = max(a["num_needle_k"], a["num_needle_q"])
        if a["type_haystack"] == "essay":
            self.haystack = self.res.get("essay")
        if "words" in (a["type_needle_k"], a["type_needle_v"]):
            self.words = self.res.get("niah_words")

    def random(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.rng.randint(10 ** 6, 10 ** 7 - 1))
        if kind == "words":
            return self.rng.choice(self.words)
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def make(self, num_haystack: int) -> tuple[str, list]:
        a, rng = self.a, self.rng
        keys, values, needles = [], [], []
        for _ in range(self.num_k):
            keys.append(self.random(a["type_needle_k"]))
            value = []
            for _ in range(a["num_needle_v"]):
                value.append(self.random(a["type_needle_v"]))
                needles.append(NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.seed).shuffle(needles)  # RULER's fixed-seed shuffle, kept
        if a["type_haystack"] == "essay":
            hay = self.haystack
            words = hay[:num_haystack] if num_haystack <= len(hay) else \
                (hay * ((num_haystack + len(hay) - 1) // len(hay)))[:num_haystack]
            sents = self.res.get("sent_tokenize")(" ".join(words).strip())
            pos = [0] + sorted(int(len(sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(pos)):
                parts.append(" ".join(sents[pos[i - 1]:pos[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if a["type_haystack"] == "noise":
                sentences = [NOISE] * num_haystack
            else:
                sentences = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=self.random(a["type_needle_k"]),
                                           value=self.random(a["type_needle_v"])) for _ in range(num_haystack)]
            for index, element in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
                sentences.insert(index, element)
            context = "\n".join(sentences)
        indices = rng.sample(range(self.num_k), a["num_needle_q"])
        queries = [keys[i] for i in indices]
        answers = [v for i in indices for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_v = self.template, a["type_needle_v"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:  # RULER's plain str.replace on the whole template
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(old, new)
            type_v = type_v[:-1]
        return template.format(type_needle_v=type_v, context=context, query=query), answers

    def samples(self, n: int) -> list[RulerSample]:
        essay = self.a["type_haystack"] == "essay"
        inc = 500 if essay else (5 if self.length < 4096 else 25)
        size = _search(lambda k: self.make(k)[0], self.count, self.length, self.ttg, inc, inc, 3)
        out = []
        for i in range(n):
            text, answer, length = _fit(self.make, self.count, size, inc, self.ttg, self.length, self.task.name)
            inp, prefix = _split_prefix(text, self.task.spec.answer_prefix)
            out.append(RulerSample(i, inp, answer, length, prefix))
        return out


class _VariableTracking(_Gen):
    def chains(self, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        rng, chains_n = self.rng, self.a["num_chains"]
        k, hops = (3, min(10, self.a["num_hops"])) if is_icl else (5, self.a["num_hops"])
        names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((hops + 1) * chains_n)]
        while len(set(names)) < chains_n * (hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
        # RULER slices the list with its duplicates left in (an IndexError on a repeated name);
        # dropping repeats keeps every chain whole.
        names = list(dict.fromkeys(names))
        vars_ret, chains_ret = [], []
        for i in range(0, len(names), hops + 1):
            v = names[i:i + hops + 1]
            vars_ret.append(v)
            chain = [f"VAR {v[0]} = 12345" if is_icl else f"VAR {v[0]} = {rng.randint(10000, 99998)}"]
            chain += [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(hops)]
            chains_ret.append(chain)
        return vars_ret, chains_ret

    def make(self, num_noises: int, is_icl: bool = False) -> tuple[str, list]:
        names, chains = self.chains(is_icl)
        value = chains[0][0].split("=")[-1].strip()
        sentences = [NOISE] * num_noises  # synthetic.yaml's vt uses the noise haystack
        for chain in chains:
            positions = sorted(self.rng.sample(range(len(sentences)), len(chain)))
            for j, p in enumerate(positions):
                sentences.insert(p + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        hops = min(10, self.a["num_hops"]) if is_icl else self.a["num_hops"]
        return self.template.format(context=context, query=value, num_v=hops + 1), names[0]

    def randomize_icl(self, example: str) -> str:
        for item in example.strip().split()[-self.a["num_hops"] - 1:]:
            example = example.replace(item, "".join(self.rng.choices(string.ascii_uppercase, k=len(item))))
        return example.replace("12345", str(self.rng.randint(10000, 99998)))

    def samples(self, n: int) -> list[RulerSample]:
        # The one-shot example: a complete 500-token task (answers appended), generated first.
        icl_make = lambda k: self.make(k, is_icl=True)  # noqa: E731
        size = _search(lambda k: icl_make(k)[0], self.count, 500, 0, 5, 5, 3)
        text, answer, _ = _fit(icl_make, self.count, size, 5, 0, 500, "vt")
        icl = text + " " + " ".join(answer) + "\n"
        icl_tokens = self.count(icl)
        inc = 5 if self.length < 4096 else 10
        size = _search(lambda k: self.make(k)[0], self.count, self.length, icl_tokens + self.ttg, inc, inc, 3)
        head = self.task.spec.template[:20]

        def make_with_icl(k: int) -> tuple[str, list]:
            text, answer = self.make(k)
            cut = text.index(head)
            return text[:cut] + self.randomize_icl(icl) + "\n" + text[cut:], answer

        out = []
        for i in range(n):
            text, answer, length = _fit(make_with_icl, self.count, size, inc, self.ttg, self.length, "vt")
            inp, prefix = _split_prefix(text, self.task.spec.answer_prefix)
            out.append(RulerSample(i, inp, answer, length, prefix))
        return out


class _CommonWords(_Gen):
    def __init__(self, *args):
        super().__init__(*args)
        ww = self.res.get("wonderwords")
        self.words = sorted(set(ww["noun"] + ww["adjective"] + ww["verb"]))
        random.Random(self.seed).shuffle(self.words)

    def example(self, num_words: int, common_repeats: int, uncommon_repeats: int, common_nums: int):
        pool = self.words if num_words <= len(self.words) else self.res.get("english_words")
        full = self.rng.sample(pool, num_words)
        common, uncommon = full[:common_nums], full[common_nums:]
        word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.seed).shuffle(word_list)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common

    def make(self, num_words: int) -> tuple[str, list]:
        a = self.a
        if self.length < 4096:  # RULER shrinks the repeats below 4K
            shots = [self.example(20, 3, 1, a["num_cw"])]
            context, answer = self.example(num_words, 6, 1, a["num_cw"])
        else:
            shots = [self.example(40, 10, 3, a["num_cw"])]
            context, answer = self.example(num_words, a["freq_cw"], a["freq_ucw"], a["num_cw"])
        shots_text = "\n".join(self.template.format(num_cw=a["num_cw"], context=c, query="") + " " +
                               " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans)) for c, ans in shots)
        return shots_text + "\n" + self.template.format(num_cw=a["num_cw"], context=context, query=""), answer

    def samples(self, n: int) -> list[RulerSample]:
        size = _search(lambda k: self.make(k)[0], self.count, self.length, self.ttg, 10, 4096, 2, floor_div=True)
        out = []
        for i in range(n):
            text, answer, length = _fit(self.make, self.count, size, 10, self.ttg, self.length, "cwe")
            inp, prefix = _split_prefix(text, self.task.spec.answer_prefix)
            out.append(RulerSample(i, inp, answer, length, prefix))
        return out


class _FreqWords(_Gen):
    def make(self, max_len: int, num_words: int, vocab_size: int, incremental: int) -> tuple[str, list, int]:
        rng, alpha = self.rng, self.a["alpha"]
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # RULER: the top-ranked word is noise
        z = zeta(alpha)

        def text_of(num: int) -> tuple[str, list]:
            counts = (num * (np.arange(1, len(vocab) + 1, dtype=np.float64) ** -alpha) / z).astype(int)
            words = [w for w, c in zip(vocab, counts) for _ in range(c)]
            random.Random(self.seed).shuffle(words)
            return self.template.format(context=" ".join(words), query=""), vocab[1:4]

        if num_words > 0:
            text, _ = text_of(num_words)
            while self.count(text) > max_len:
                num_words -= incremental
                text, _ = text_of(num_words)
        else:
            num_words = max_len // 6
            text, _ = text_of(num_words)
            while self.count(text) < max_len:
                num_words += incremental
                text, _ = text_of(num_words)
            num_words -= incremental
        text, answer = text_of(num_words)
        return text, answer, num_words

    def samples(self, n: int) -> list[RulerSample]:
        budget = self.length - self.ttg
        vocab_size, inc = budget // 50, budget // 32
        if vocab_size < 4 or inc < 1:
            raise ValueError(f"RULER fwe: length {self.length} is too short (needs a vocabulary of >= 4 words)")
        _, _, num = self.make(budget, -1, vocab_size, inc)
        out = []
        for i in range(n):
            text, answer, _ = self.make(budget, num, vocab_size, inc)
            length = self.count(text) + self.ttg
            inp, prefix = _split_prefix(text, self.task.spec.answer_prefix)
            out.append(RulerSample(i, inp, answer, length, prefix))
        return out


class _QA(_Gen):
    def __init__(self, *args):
        super().__init__(*args)
        self.qas, self.docs = self.res.get(self.a["dataset"])

    def make(self, index: int, num_docs: int) -> tuple[str, list]:
        q = self.qas[index]
        cur, more = q["context"], q.get("more_context", [])
        if num_docs < len(self.docs):
            if num_docs - len(cur) > len(more):
                taken = set(cur + more)
                extra = [i for i in range(len(self.docs)) if i not in taken]
                ids = cur + more + self.rng.sample(extra, max(0, num_docs - len(cur) - len(more)))
            else:
                ids = cur + self.rng.sample(more, num_docs - len(cur))
            docs = [self.docs[i] for i in ids]
        else:
            docs = (self.docs * ((num_docs + len(self.docs) - 1) // len(self.docs)))[:num_docs]
        random.Random(self.seed).shuffle(docs)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        return self.template.format(context=context, query=q["query"]), q["outputs"]

    def samples(self, n: int) -> list[RulerSample]:
        if n > len(self.qas):
            raise ValueError(f"RULER {self.task.name}: {n} samples asked, the dataset has {len(self.qas)} questions")
        size = _search(lambda k: self.make(0, k)[0], self.count, self.length, self.ttg, 10, 10, 3)
        out = []
        for i in range(n):
            text, answer, length = _fit(lambda k: self.make(i, k), self.count, size, 10, self.ttg, self.length,
                                        self.task.name)
            inp, prefix = _split_prefix(text, self.task.spec.answer_prefix)
            out.append(RulerSample(i, inp, list(answer), length, prefix))
        return out


GENERATORS = {"niah": _Niah, "variable_tracking": _VariableTracking, "common_words_extraction": _CommonWords,
              "freq_words_extraction": _FreqWords, "qa": _QA}


def generate(task: str, num_samples: int, length: int, count: CountTokens, resources: Resources,
             seed: int = 42) -> list[RulerSample]:
    """`num_samples` samples of RULER task `task` fitted to `length` tokens (prompt + generation),
    counting tokens with `count` (the model's tokenizer, no special tokens)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; expected one of {', '.join(TASKS)}")
    spec = TASKS[task]
    return GENERATORS[spec.base](spec, int(length), count, resources, seed).samples(num_samples)


def needs(task: str) -> set[str]:
    """Which inputs a task reads (for early checks and the run header)."""
    a = TASKS[task].args
    out: set[str] = set()
    if a.get("type_haystack") == "essay":
        out |= {"essay", "sent_tokenize"}
    if TASKS[task].base == "qa":
        out.add(a["dataset"])
    if TASKS[task].base == "common_words_extraction":
        # RULER's common_words_extraction.py loads english_words.json at start, whatever the length
        out |= {"wonderwords", "english_words"}
    if "words" in (a.get("type_needle_k"), a.get("type_needle_v")):
        out.add("wonderwords")
    return out


