"""The Megatron evaluation backend against transformers, at CP=1 and with the prompt split over CP=2.

Independent reference: the same weights in transformers' LlamaForCausalLM (HF RoPE, HF SDPA,
HF KV-cache decoding). Checked: last-position logits (fp32, atol 1e-4), greedy tokens (equal),
per-token losses, and the whole NIAH grid from a saved Megatron checkpoint (same predictions as
the HF backend). Prompt lengths are chosen NOT divisible by 2*CP, so the right padding is exercised.
"""
import json
import os

import torch

from dist_utils import run_distributed

PROMPT_LENGTHS = (37, 130)  # 37 % 4 != 0, 130 % 4 != 0
NEW_TOKENS = 6


def _models():
    from eval_helpers import tiny_eval_llama, train_tiny_tokenizer
    from megatron_ultralong.eval import EvalTokenizer

    tok = train_tiny_tokenizer()
    return EvalTokenizer.wrap(tok), tiny_eval_llama(len(tok))


def _megatron_backend(hf, cp: int, cp_comm_type: str = "p2p", tp: int = 1):
    from megatron_ultralong.convert.model_weights import load_hf_weights
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.model import LlamaConfig, build_model
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    rt = init_runtime(ParallelConfig(tensor_parallel=tp, context_parallel=cp, cp_comm_type=cp_comm_type), device="cpu")
    cfg = LlamaConfig.from_hf(hf.config)
    model = build_model(cfg, rt, loss_chunk_tokens=64)
    load_hf_weights(model, cfg, hf.state_dict().__getitem__, rt.pg_collection.tp)
    return MegatronBackend(model, rt), rt


def _prompts(vocab: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _compare_to_hf(tok, hf, cp, cp_comm_type, tp=1):
    from megatron_ultralong.eval import HFBackend

    ref = HFBackend(hf, prefill_chunk=50, loss_chunk=40)
    backend, rt = _megatron_backend(hf, cp=cp, cp_comm_type=cp_comm_type, tp=tp)
    for ids in _prompts(tok.vocab_size):
        logits = backend.next_token_logits(ids)
        full = hf(torch.tensor([ids])).logits[0, -1].detach()
        torch.testing.assert_close(logits, full, rtol=0, atol=1e-4, msg=f"tp={tp} cp={cp} {cp_comm_type} n={len(ids)}")
        assert backend.generate(ids, NEW_TOKENS) == ref.generate(ids, NEW_TOKENS)
        torch.testing.assert_close(backend.token_losses(ids), ref.token_losses(ids), rtol=0, atol=1e-4)
    return backend, rt


def _cp1(rank, world_size):
    from megatron_ultralong.parallel.runtime import shutdown_runtime

    tok, hf = _models()
    _compare_to_hf(tok, hf, 1, "p2p")
    shutdown_runtime()


def test_megatron_backend_matches_hf_at_cp1():
    run_distributed(_cp1, world_size=1)


def _cp2(rank, world_size, out_dir):
    """TP=2 (vocab-parallel logits gathered), ring and all-gather CP prefill vs HF, then NIAH from a
    checkpoint saved and loaded at CP=2 (one spawn for all: process start-up dominates on 2 cores)."""
    from megatron_ultralong.checkpoint.torch_dist import save_megatron_checkpoint
    from megatron_ultralong.eval import run_niah
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.parallel.runtime import shutdown_runtime

    tok, hf = _models()
    _compare_to_hf(tok, hf, 1, "p2p", tp=world_size)
    _compare_to_hf(tok, hf, world_size, "all_gather")
    backend, rt = _compare_to_hf(tok, hf, world_size, "p2p")
    ckpt = os.path.join(out_dir, "ckpt")
    save_megatron_checkpoint(backend.model, ckpt)
    loaded = MegatronBackend.from_checkpoint(ckpt, rt)
    res = run_niah(loaded, tok, [160, 224], [0.0, 1.0], os.path.join(out_dir, "megatron"), log=False)
    assert (res.heatmap_path is not None) == (rank == 0)
    shutdown_runtime()


def test_tp2_and_cp2_match_hf_and_niah_runs_from_a_checkpoint(tmp_path):
    from megatron_ultralong.eval import HFBackend, run_niah

    run_distributed(_cp2, world_size=2, args=(str(tmp_path),))
    with open(tmp_path / "megatron" / "niah_results.json") as f:
        got = json.load(f)
    assert os.path.getsize(tmp_path / "megatron" / "niah_heatmap.png") > 1000
    tok, hf = _models()
    want = run_niah(HFBackend(hf), tok, [160, 224], [0.0, 1.0], None, log=False)
    assert [s["prediction"] for s in got["samples"]] == [s["prediction"] for s in want.samples]
    assert got["scores"] == [list(r) for r in want.scores]
