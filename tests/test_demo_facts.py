"""The demo's and the miniature's pieces: the fact-and-recall documents, their tokenizer, the NIAH
task built on them, the length-upsampled dataset, the shipped base model and the miniature's scorer.

Independent references: the tokenizer's own encoding of each text piece (not the generator's
bookkeeping), megatron-core's IndexedDataset reader for the built .bin/.idx, and transformers'
greedy `generate` for the miniature's teacher-forced scorer.
"""
import json
import os
import random

import pytest
import torch
import transformers

import demo
import miniature
import miniature_base
from megatron_ultralong.eval.haystack import Haystack
from megatron_ultralong.eval.niah import make_niah_sample, run_niah
from megatron_ultralong.eval.tokenizer import EvalTokenizer
from toydata import facts

BASE = os.path.join(os.path.dirname(__file__), "..", "examples", "toydata", "base_l64")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("facts_tok"))
    facts.save_hf_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return EvalTokenizer.from_path(tok_dir)


@pytest.mark.parametrize("n", [17, 30, 64, 255])
def test_document_holds_its_fact_and_ends_with_the_recall(tok, n):
    rng = random.Random(n)
    for _ in range(20):
        doc = facts.make_document(rng, n)
        ids = tok.encode(doc.text)
        fact = tok.encode(" " + facts.fact_text(doc.key, doc.value))
        assert len(ids) == n == doc.num_tokens
        assert len(fact) == facts.FACT_TOKENS
        assert ids[doc.fact_start:doc.fact_start + len(fact)] == fact
        assert ids[-len(fact):] == fact
        # The value occurs only in the fact and its recall: the filler has no digits, keys or "is".
        filler = ids[:doc.fact_start] + ids[doc.fact_start + len(fact):-len(fact)]
        assert len(filler) == n - 2 * facts.FACT_TOKENS
        assert {tok.decode([i]).strip() for i in filler} <= set(facts.FILLER_WORDS)
        assert tok.hf_tokenizer.unk_token_id not in ids


def test_tokenizer_round_trips_and_is_word_level(tok):
    text = "cat sat amber is 4821 . near"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == 6 + 1 + 4  # six words ("." included), "▁" before the digits, four digits
    assert tok.encode(facts.SEPARATOR) == [tok.bos_id]  # BOS is the separator documents start with


def test_too_short_document_is_refused():
    with pytest.raises(ValueError, match="num_tokens=16"):
        facts.make_document(random.Random(0), 16)


class _Oracle:
    """A backend that answers from the prompt: the digits after the first "amber is"."""

    is_writer = True

    def __init__(self, tok):
        self.tok = tok
        self.prompts = []

    def generate(self, ids, max_new_tokens, stop_ids=()):
        self.prompts.append(list(ids))
        key = self.tok.encode(f" {facts.NIAH_KEY} is")
        at = next(i for i in range(len(ids)) if list(ids[i:i + 2]) == key)
        return list(ids[at + 2:at + 2 + 6])


def test_run_niah_uses_the_task_haystack_and_finds_tokenized_needles(tok, tmp_path):
    hay = Haystack(tok, "facts", text=facts.haystack_text())
    oracle = _Oracle(tok)
    res = run_niah(oracle, tok, [64, 256], [0.0, 0.5, 1.0], str(tmp_path), facts.niah_config(2), log=False,
                   haystack=hay)
    assert res.mean_score == 1.0
    unk = tok.hf_tokenizer.unk_token_id
    for prompt, rec in zip(oracle.prompts, res.samples):
        assert unk not in prompt and prompt[0] == tok.bos_id
        needle = tok.encode(" " + facts.fact_text(facts.NIAH_KEY, rec["answers"][0]))
        start = rec["needles"][0]["start"]
        assert prompt[start:start + len(needle)] == needle
        assert prompt[-2:] == tok.encode(f" {facts.NIAH_KEY} is")
    assert os.path.exists(res.heatmap_path)


def test_upsampled_dataset_has_separators_and_whole_documents(tmp_path, tok_dir, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ultralong.data.preprocess.builder import build_dataset
    from megatron_ultralong.data.preprocess.recipe import load_recipe

    corpus = str(tmp_path / "c.jsonl")
    facts.write_corpus(corpus, facts.corpus_records(200, seed=3, lengths=demo.DOMAINS))
    prefix = str(tmp_path / "up")
    recipe = demo.write_data_recipe(str(tmp_path / "r.yaml"), corpus, os.path.join(tok_dir, "tokenizer.json"),
                                    prefix, total_tokens=20_000)
    report = build_dataset(load_recipe(recipe), progress=False)
    ds = IndexedDataset(prefix)
    assert len(ds) == report["output"]["documents"] > 0
    lengths = []
    for i in range(len(ds)):
        doc = ds[i].tolist()
        assert doc[0] == tok.bos_id and tok.bos_id not in doc[1:]
        lengths.append(len(doc) - 1)
        recall, body = doc[-facts.FACT_TOKENS:], doc[1:-facts.FACT_TOKENS]  # whole document: fact ... recall
        assert any(body[j:j + facts.FACT_TOKENS] == recall for j in range(len(body)))
    # Upsampling: documents >= 2L are over-represented relative to the source.
    src = [len(tok.encode(json.loads(line)["text"])) for line in open(corpus)]
    share = lambda xs: sum(x for x in xs if x >= 2 * demo.L) / sum(xs)  # noqa: E731
    assert share(lengths) > share(src)


def test_pretraining_batch_weights_the_recall_digits():
    tokenizer = transformers.AutoTokenizer.from_pretrained(BASE)
    ids, weights = miniature_base.packed_batch(random.Random(0), tokenizer, 4, 64)
    assert ids.shape == (4, 65) and weights.shape == (4, 64)
    targets = ids[:, 1:]
    heavy = weights == miniature_base.RECALL_WEIGHT
    assert heavy.any()
    digit_ids = set(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    assert {int(t) for t in targets[heavy]} <= digit_ids
    # Every up-weighted digit is followed (as a target) by another digit or "." -- the recall's digits.
    dot = tokenizer.convert_tokens_to_ids("\u2581.")
    for r, c in heavy.nonzero().tolist():
        if c + 1 < targets.shape[1]:
            assert int(targets[r, c + 1]) in digit_ids | {dot}


def test_shipped_base_model_retrieves_within_L():
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(BASE)
    assert model.config.max_position_embeddings == miniature_base.BASE_LENGTH == demo.L
    assert miniature_base.recall_accuracy(model, tokenizer, demo.L, n=32) >= 0.9


def test_pretrain_smoke(tmp_path):
    acc = miniature_base.pretrain(str(tmp_path / "base"), steps=2, rows=4, log_every=0)
    assert 0.0 <= acc <= 1.0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert reloaded.config.num_hidden_layers == 3


def test_miniature_scorer_agrees_with_greedy_generate(tok):
    """The miniature's teacher-forced check == transformers' greedy decoding of the six answer tokens."""
    model = demo.yarn_untrained(BASE)
    hay = Haystack(tok, "facts", text=facts.haystack_text())
    cfg = facts.niah_config(seed=5)
    res = miniature.evaluate(model, tok, samples=6, seed=5)
    for length in miniature.LENGTHS[:3]:
        hits = []
        for i in range(6):
            s = make_niah_sample(tok, hay, cfg, length, i / 5, i)
            out = model.generate(torch.tensor([s.prompt.ids]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=1)[0, length:].tolist()
            hits.append(out == tok.encode(f" {s.answers[0]} ."))
        assert res["accuracy"][length] == pytest.approx(sum(hits) / 6)
    assert len(res["filler_loss_by_position"]) == 8


def test_chat_tokenizer_extends_the_vocabulary_and_splits_turns_exactly(tok_dir, tmp_path):
    """The SFT stage's tokenizer: the toy ids unchanged, Llama-3's chat tokens appended, and the
    per-segment tokenization (assistant-only loss mask) equal to the whole text's (ChatTokenizer.verify,
    which tokenizes the rendered string with HF tokenizers)."""
    from tokenizers import Tokenizer

    from megatron_ultralong.data.samples.chat import ChatFormat, ChatTokenizer
    from megatron_ultralong.data.samples.chat_convert import normalize_record

    plain, chat = Tokenizer.from_str(facts.tokenizer_json()), Tokenizer.from_str(facts.chat_tokenizer_json())
    text = facts.haystack_text(200) + " amber is 4821 ."
    assert chat.encode(text).ids == plain.encode(text).ids
    assert chat.get_vocab_size() == plain.get_vocab_size() + len(facts.CHAT_WORDS) + len(facts.CHAT_CONTROL) + 1
    ct = ChatTokenizer(chat, ChatFormat("llama3"))
    for i, record in enumerate(facts.chat_records(20, seed=1, max_context_tokens=demo.L - demo.CHAT_OVERHEAD)):
        messages = normalize_record(record, f"record {i}")["messages"]
        ct.verify(messages, f"record {i}")
        ids, trainable = ct.encode(messages)
        assert len(ids) <= demo.L
        reply = chat.decode(ids[trainable].tolist(), skip_special_tokens=False)
        assert reply.strip() == messages[1]["content"] + "<|eot_id|>"
        assert (chat.token_to_id("<unk>") not in ids.tolist())


def test_chat_niah_prompt_is_the_sft_format(tmp_path):
    """The chat NIAH prompt ends with the assistant header and has exactly the requested length."""
    chat_dir = str(tmp_path / "chat")
    facts.save_hf_chat_tokenizer(chat_dir)
    chat_tok = EvalTokenizer.from_path(chat_dir)
    hay = Haystack(chat_tok, "facts", text=facts.haystack_text())
    s = make_niah_sample(chat_tok, hay, facts.chat_niah_config(), 256, 0.5, 0)
    assert len(s.prompt.ids) == 256
    text = chat_tok.hf_tokenizer.decode(s.prompt.ids, skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>")
    assert text.endswith("what is amber ?<|eot_id|><|start_header_id|> assistant<|end_header_id|>\n\n")
    assert f"amber is {s.answers[0]} ." in text
