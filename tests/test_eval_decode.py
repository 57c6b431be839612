"""Cached decoding from a CP-sharded KV cache against transformers' `generate` (with its KV cache).

Independent reference: the same weights in transformers' LlamaForCausalLM; `generate(do_sample=False,
output_logits=True)` gives its greedy tokens and the raw logits of every step. Checked at CP=1, CP=3
(odd) and TP=2 x CP=2, on a GQA model with default RoPE and one with YaRN (prompts past the original
context, so YaRN's interpolation and attention factor matter), prompt lengths not multiples of 2*CP
(1 token: two of three CP ranks start with an empty cache shard):
- greedy tokens identical to transformers' generate, stopping at the same EOS;
- the logits of every decoding step within 1e-5 (fp32) of transformers';
- the cache fork: several continuations of one context give the same tokens as separate generate
  calls and as the HF backend, and prefill the context once.
"""
import torch

from dist_utils import run_distributed

NEW_TOKENS = 8
ATOL = 1e-5
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _hf_models():
    from eval_helpers import tiny_llama

    vocab = 300
    return [("gqa", tiny_llama(vocab)), ("yarn", tiny_llama(vocab, seed=1, rope_scaling=YARN, max_position_embeddings=256))]


def _backend(hf, rt):
    from megatron_ultralong.convert.model_weights import load_hf_weights
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.model import LlamaConfig, build_model

    cfg = LlamaConfig.from_hf(hf.config)
    model = build_model(cfg, rt)
    load_hf_weights(model, cfg, hf.state_dict().__getitem__, rt.pg_collection.tp)
    return MegatronBackend(model, rt)


def _hf_generate(hf, ids):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=hf.config.eos_token_id)
    return out.sequences[0, len(ids):].tolist(), [row[0].float() for row in out.logits]


def _check_decode(backend, hf, ids, what):
    """Step by step against transformers: the same token and logits within ATOL at every step."""
    want_tokens, want_logits = _hf_generate(hf, ids)
    state, logits = backend.prefill(ids)
    got_tokens = []
    for step, want in enumerate(want_logits):
        torch.testing.assert_close(logits.cpu(), want, rtol=0, atol=ATOL, msg=f"{what} n={len(ids)} step {step}")
        got_tokens.append(int(logits.argmax()))
        if len(got_tokens) < len(want_logits):
            logits = backend.step(state, got_tokens[-1])
    assert got_tokens == want_tokens, what
    eos = hf.config.eos_token_id
    assert backend.generate(ids, NEW_TOKENS, stop_ids=(eos,)) == want_tokens, what
    # The cache stays balanced: shards differ by at most one token beyond the prefill's split.
    assert max(state.counts) - min(state.counts) <= max(1, max(state.prefix.counts) - min(state.prefix.counts))


def _check_fork(backend, hf, what):
    from megatron_ultralong.eval import HFBackend

    g = torch.Generator().manual_seed(5)
    context = torch.randint(2, 300, (75,), generator=g).tolist()
    suffixes = [[], torch.randint(2, 300, (5,), generator=g).tolist(), torch.randint(2, 300, (9,), generator=g).tolist()]
    before = backend.prefilled_tokens
    got = backend.generate_many(context, suffixes, NEW_TOKENS)
    assert backend.prefilled_tokens - before == len(context), f"{what}: the context was prefilled more than once"
    assert got == [backend.generate(context + s, NEW_TOKENS) for s in suffixes], what
    ref = HFBackend(hf, prefill_chunk=32)
    assert got == ref.generate_many(context, suffixes, NEW_TOKENS) == [ref.generate(context + s, NEW_TOKENS) for s in suffixes]


def _run(rank, world_size, tp, cp, lengths):
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime

    rt = init_runtime(ParallelConfig(tensor_parallel=tp, context_parallel=cp), device="cpu")
    g = torch.Generator().manual_seed(3)
    for name, hf in _hf_models():
        backend = _backend(hf, rt)
        from megatron_ultralong.eval.megatron_backend import MegatronBackend

        # the grid's resume key names the weights: stable for the same model, set on every rank
        assert backend.fingerprint == MegatronBackend(backend.model, rt).fingerprint
        assert backend.identity.startswith(f"megatron/tp={tp}/cp={cp}/")
        for n in lengths:
            assert n % (2 * cp) != 0 or cp == 1
            ids = torch.randint(2, 300, (n,), generator=g).tolist()
            _check_decode(backend, hf, ids, f"{name} tp={tp} cp={cp}")
        if name == "gqa":
            _check_fork(backend, hf, f"tp={tp} cp={cp}")
    shutdown_runtime()


def test_cached_decode_matches_transformers_generate_cp1():
    run_distributed(_run, world_size=1, args=(1, 1, (1, 37, 130)))


def test_cached_decode_matches_transformers_generate_cp3():
    run_distributed(_run, world_size=3, args=(1, 3, (1, 37, 130)))


def test_cached_decode_matches_transformers_generate_tp2_cp2():
    run_distributed(_run, world_size=4, args=(2, 2, (37, 130)))
