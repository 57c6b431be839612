"""The plugin's Megatron-Core Llama equals transformers' LlamaForCausalLM with the same weights.

Independent reference: HF computes RoPE (incl. the YaRN attention factor on cos/sin), GQA and the
SwiGLU MLP its own way; we load its weights through the key map and compare logits (fp32, 1e-5),
the loss (through the chunked output layer + cross entropy of the training path) and every
parameter gradient (mapped back to HF names), at TP=1 and TP=2.
"""
import pytest
import torch

from dist_utils import run_distributed
from llama_helpers import tiny_llama

ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "beta_fast": 4.0,
             "beta_slow": 1.0},
}
# (rope, kv heads, tied): GQA and MHA, tied and untied, every rope type.
CASES = [("default", 2, False), ("llama3", 4, True), ("yarn", 2, False), ("yarn", 4, True)]
SEQ = 48  # beyond original_max_position_embeddings=32, so the scaling matters


def _compare(rank, world_size, out_dir):
    from megatron_ultralong.convert.model_weights import export_hf_weights, load_hf_weights
    from megatron_ultralong.model import LlamaConfig, build_model, gather_tp_logits
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    rt = init_runtime(ParallelConfig(tensor_parallel=world_size))
    tp = rt.pg_collection.tp
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1003, (2, SEQ + 1), generator=g)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(SEQ)[None].expand(2, -1)
    results = {}
    for rope, kv, tied in CASES:
        hf = tiny_llama(1003, kv, tied, ROPES[rope], max_position_embeddings=512)
        cfg = LlamaConfig.from_hf(hf.config)
        # The training path below: output layer + cross entropy in chunks of 16 tokens.
        model = build_model(cfg, rt, loss_chunk_tokens=16)
        load_hf_weights(model, cfg, hf.state_dict().__getitem__, tp)

        hf_out = hf(tokens, labels=tokens)  # labels only to get HF's own loss path below
        hf_loss = torch.nn.functional.cross_entropy(hf_out.logits.reshape(-1, 1003), labels.reshape(-1))
        hf_loss.backward()

        logits = model(tokens, positions, None)  # [b, s, V_pad / TP]
        full = gather_tp_logits(logits.detach(), tp, cfg.vocab_size)
        case = f"{rope}-kv{kv}-{'tied' if tied else 'untied'}"
        diff = (full - hf_out.logits.detach()).abs().max().item()
        assert diff <= 1e-5, f"{case}: max |logit diff| {diff}"
        # The training path: output layer + cross entropy in chunks of 16 tokens (3 chunks of 8
        # rows at b=2), recomputed in backward, padded vocab rows masked.
        per_token = model(tokens, positions, None, labels=labels)  # [b, s]
        assert per_token.shape == (2, SEQ)
        loss = per_token.mean()
        assert abs(loss.item() - hf_loss.item()) <= 1e-5, (case, loss.item(), hf_loss.item())
        loss.backward()

        # Gradients, mapped back to HF names through the same key map (gathered over TP).
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.grad)
        hf_grads = {n: p.grad for n, p in hf.named_parameters()}
        exported = dict(export_hf_weights(model, cfg, tp))
        assert set(exported) == set(hf_grads), case
        for name, grad in exported.items():
            torch.testing.assert_close(grad, hf_grads[name], rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
        results[case] = full
    torch.save(results, f"{out_dir}/logits_tp{world_size}_rank{rank}.pt")


def test_logits_loss_and_grads_match_hf_tp1_and_tp2(tmp_path):
    run_distributed(_compare, world_size=1, args=(str(tmp_path),))
    run_distributed(_compare, world_size=2, args=(str(tmp_path),))
    tp1 = torch.load(tmp_path / "logits_tp1_rank0.pt")
    for rank in (0, 1):
        tp2 = torch.load(tmp_path / f"logits_tp2_rank{rank}.pt")
        for case, logits in tp1.items():
            torch.testing.assert_close(tp2[case], logits, rtol=0, atol=1e-5, msg=case)


def test_tp_that_does_not_divide_heads_is_refused():
    from megatron_ultralong.model import PRESETS, to_transformer_config
    from megatron_ultralong.parallel.runtime import ParallelConfig, Runtime

    rt = Runtime(device=torch.device("cpu"), rank=0, world_size=3, parallel=ParallelConfig(tensor_parallel=3),
                 data_parallel_size=1, pg_collection=None)
    with pytest.raises(ValueError, match=r"tensor_parallel=3 does not divide num_attention_heads=4"):
        to_transformer_config(PRESETS["tiny"], rt)
