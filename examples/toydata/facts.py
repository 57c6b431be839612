"""Synthetic "fact and recall" documents: the miniature's corpus, tokenizer and NIAH task.

A document is filler text from a small bigram Markov chain with one fact placed at a random depth
and its recall at the end:

    <filler> KEY is 4821 . <filler> KEY is 4821 .

Predicting the recall's digits needs the fact, however far back it is; predicting the filler needs
only the previous word. So the LM loss on these documents trains exactly the skill NIAH measures
(copying from far back), while no eval prompt is ever trained on: NIAH uses one fixed filler text
and one key, documents use fresh filler and any key.

The tokenizer is word-level (one token per word, one per digit), so lengths and distances are exact
in tokens and the model is tiny: NUM_SPECIAL specials, the separator, the filler words, the keys,
"is", ".", "▁" and ten digits -- 65 tokens in all. Its text form is a normal HF tokenizer.json
(Metaspace pre-tokenizer + individual digits), so `mu-build-dataset`, transformers and the eval
package use it like any other tokenizer and decoding gives back "4821", which NIAH's scorer matches.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

FILLER_WORDS = (
    "the a cat dog sat ran on mat red big old sun hill tree sky blue went over under near and then "
    "slow fast bird fish sang swam home far road rain"
).split()
KEYS = "amber basil cedar delta ember fjord garnet hazel indigo jasper kilo lotus maple nova onyx pearl".split()
SEPARATOR = "<s>"
"""The paper's document separator, written as text; one token here ("▁<s>")."""
SPECIALS = ("<unk>", "<pad>", "<eos>")
NUM_SPECIAL = len(SPECIALS)
FACT_DIGITS = 4
FACT_TOKENS = 4 + FACT_DIGITS  # KEY, is, "▁" (digits start a word), d1..d4, "."
NIAH_KEY = "amber"
"""The key NIAH asks for (documents use all KEYS; the eval prompt uses this one)."""


def _word(w: str) -> str:
    return "\u2581" + w


def vocabulary() -> List[str]:
    """Token strings in id order."""
    return [*SPECIALS, _word(SEPARATOR), "\u2581", _word("is"), _word("."),
            *[str(d) for d in range(10)], *map(_word, FILLER_WORDS), *map(_word, KEYS)]


def tokenizer_json() -> str:
    """The word-level tokenizer as an HF tokenizer.json string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    meta = dict(replacement="\u2581", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(**meta), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace(**meta)
    return tok.to_str()


def save_hf_tokenizer(directory: str):
    """Write the tokenizer as an HF directory; BOS is the separator (every prompt then starts the way
    every training document does), EOS "<eos>" (never in the data), pad "<pad>". Returns it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json()),
                                 bos_token=_word(SEPARATOR), eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.save_pretrained(directory)
    return hf


@dataclass(frozen=True)
class MarkovFiller:
    """A bigram chain over FILLER_WORDS: each word has `fanout` successors with random weights, so
    filler is predictable from the previous word (LM loss well below uniform) but never repeats."""

    seed: int = 0
    fanout: int = 4

    def table(self) -> List[Tuple[List[str], List[float]]]:
        rng = random.Random(self.seed)
        return [(rng.sample(FILLER_WORDS, self.fanout), [rng.random() + 0.2 for _ in range(self.fanout)])
                for _ in FILLER_WORDS]

    def words(self, rng: random.Random, n: int) -> List[str]:
        table = self.table()
        index = {w: i for i, w in enumerate(FILLER_WORDS)}
        out = [rng.choice(FILLER_WORDS)]
        while len(out) < n:
            succ, weights = table[index[out[-1]]]
            out.append(rng.choices(succ, weights)[0])
        return out[:n]


@dataclass(frozen=True)
class FactDocument:
    """One document and the ground truth about it (token counts exclude the separator)."""

    text: str
    key: str
    value: str
    num_tokens: int
    fact_start: int
    """Token index of the fact's KEY within the document."""


def fact_text(key: str, value: str) -> str:
    return f"{key} is {value} ."


def make_document(rng: random.Random, num_tokens: int, filler: MarkovFiller = MarkovFiller()) -> FactDocument:
    """A document of exactly `num_tokens` tokens (>= 2 * FACT_TOKENS + 1): filler, the fact at a
    uniformly random depth of the filler, more filler, the recall."""
    n_filler = num_tokens - 2 * FACT_TOKENS
    if n_filler < 1:
        raise ValueError(f"num_tokens={num_tokens}: expected >= {2 * FACT_TOKENS + 1}")
    key = rng.choice(KEYS)
    value = str(rng.randrange(10 ** (FACT_DIGITS - 1), 10 ** FACT_DIGITS))
    words = filler.words(rng, n_filler)
    at = rng.randrange(0, n_filler)  # filler words before the fact (>= 0, the recall needs >= 1 after)
    fact = fact_text(key, value)
    text = " ".join([*words[:at], fact, *words[at:], fact])
    return FactDocument(text, key, value, num_tokens, at)


def length_for(rng: random.Random, low: int, high: int) -> int:
    """Log-uniform document length in [low, high] tokens (many short, a long tail)."""
    import math

    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def corpus_records(n_docs: int, seed: int, lengths: Sequence[Tuple[str, int, int, float]]) -> Iterator[dict]:
    """JSONL records {"text", "domain"}: `lengths` lists (domain, min tokens, max tokens, weight)."""
    rng = random.Random(seed)
    domains = [d for d, *_ in lengths]
    weights = [w for *_, w in lengths]
    spans = {d: (lo, hi) for d, lo, hi, _ in lengths}
    for _ in range(n_docs):
        domain = rng.choices(domains, weights)[0]
        doc = make_document(rng, length_for(rng, *spans[domain]))
        yield {"text": doc.text, "domain": domain}


def write_corpus(path: str, records: Iterator[dict]) -> int:
    """Write JSONL; returns the number of records."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def haystack_text(num_words: int = 4000, seed: int = 12345) -> str:
    """The NIAH filler: one long Markov text from a seed no training document uses."""
    return " ".join(MarkovFiller().words(random.Random(seed), num_words))


def niah_config(samples_per_cell: int = 1, seed: int = 0):
    """NIAH for this task: the fact is the needle, its recall prefix the question (no prefix text;
    BOS is the separator). Depths are exact (the filler has no sentence ends to snap to)."""
    from megatron_ultralong.eval.niah import NiahConfig

    return NiahConfig(prefix="", needle=" " + fact_text(NIAH_KEY, "{value}"), question=f" {NIAH_KEY} is",
                      value_digits=FACT_DIGITS, max_new_tokens=FACT_DIGITS + 2, snap_to_sentence=False,
                      scorer="all", samples_per_cell=samples_per_cell, seed=seed)


# --------------------------------------------------------------------------------------- chat (SFT)
# The SFT stage speaks Llama-3's chat format (data/samples/chat.py, "llama3"): its four control
# tokens, role headers, and "\n\n" after each header. The word-level vocabulary above has none of
# them, so the chat tokenizer appends them (ids 65..): four words for the roles and the question,
# the control tokens as special added tokens, and "\n\n" as an added token of its own. Added tokens
# split the text before pre-tokenization, so a role header and the content after it tokenize the
# same apart as together (what ChatTokenizer.verify requires). Ids below 65 are unchanged: CPT data,
# NIAH prompts and the CPT model's embeddings keep their meaning; the model's embedding grows by
# the new rows before SFT (examples/demo.py, stage "sft").
CHAT_WORDS = ("what", "?", "user", "assistant")
CHAT_CONTROL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHAT_NEWLINES = "\n\n"


def chat_tokenizer_json() -> str:
    """The word-level tokenizer extended for the chat format (see above), as a tokenizer.json string."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tokenizer_json())
    words = vocabulary() + [_word(w) for w in CHAT_WORDS]
    tok.model = type(tok.model)({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_CONTROL])
    tok.add_tokens([AddedToken(CHAT_NEWLINES, special=False, normalized=False)])
    return tok.to_str()


def save_hf_chat_tokenizer(directory: str):
    """The chat tokenizer as an HF directory (BOS <|begin_of_text|>, EOS <|eot_id|>, pad <pad>)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(chat_tokenizer_json()),
                                 bos_token=CHAT_CONTROL[0], eos_token=CHAT_CONTROL[3], pad_token="<pad>",
                                 unk_token="<unk>")
    hf.save_pretrained(directory)
    return hf


def chat_question(key: str) -> str:
    return f"what is {key} ?"


def chat_answer(value: str) -> str:
    """The assistant's reply: the value, then "." (and <|eot_id|>, which the chat format adds)."""
    return f"{value} ."


def chat_records(n: int, seed: int, max_context_tokens: int, max_facts: int = 1,
                 filler: MarkovFiller = MarkovFiller()) -> Iterator[dict]:
    """ShareGPT-layout records ({"conversations": [{"from": "human"|"gpt", "value"}]}, what
    mu-prepare-sft converts): a short context of filler holding 1..max_facts facts, then a question
    about one of them; the reply is its value. `max_context_tokens` bounds the user turn."""
    rng = random.Random(seed)
    for _ in range(n):
        n_facts = rng.randint(1, max_facts)
        keys = rng.sample(KEYS, n_facts)
        values = [str(rng.randrange(10 ** (FACT_DIGITS - 1), 10 ** FACT_DIGITS)) for _ in keys]
        budget = max_context_tokens - n_facts * FACT_TOKENS - 4  # the question is 4 tokens
        words = filler.words(rng, rng.randint(max(1, budget // 2), budget))
        cuts = sorted(rng.randint(0, len(words)) for _ in keys)
        parts, at = [], 0
        for cut, key, value in zip(cuts, keys, values):
            parts += [*words[at:cut], fact_text(key, value)]
            at = cut
        parts += words[at:]
        asked = rng.randrange(n_facts)
        yield {"conversations": [
            {"from": "human", "value": " ".join(parts) + " " + chat_question(keys[asked])},
            {"from": "gpt", "value": chat_answer(values[asked])}]}


def chat_niah_config(samples_per_cell: int = 1, seed: int = 0):
    """NIAH for the SFT'd model in its own chat format (the chat tokenizer adds <|begin_of_text|>):
    the haystack and needle form the user's turn, the question ends it, and the prompt ends with the
    assistant header; the reply must hold the value. Same needle, filler and depths as `niah_config`."""
    from megatron_ultralong.eval.niah import NiahConfig

    start, end, eot = CHAT_CONTROL[1], CHAT_CONTROL[2], CHAT_CONTROL[3]
    return NiahConfig(prefix=f"{start}user{end}{CHAT_NEWLINES}", needle=" " + fact_text(NIAH_KEY, "{value}"),
                      question=f" {chat_question(NIAH_KEY)}{eot}{start}assistant{end}{CHAT_NEWLINES}",
                      value_digits=FACT_DIGITS, max_new_tokens=FACT_DIGITS + 3, snap_to_sentence=False,
                      scorer="all", samples_per_cell=samples_per_cell, seed=seed)
