"""RoPE frequencies and attention factor equal transformers' own init functions, bit for bit."""
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_ultralong.rope import RopeConfig, compute_rope_parameters, yarn_for_context_length

LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _hf_rope_init(rope_type: str):
    """transformers' own RoPE init: 5.x moved "default" out of ROPE_INIT_FUNCTIONS into the model's
    rotary embedding class; 4.x has it in the table."""
    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return lambda config, device: LlamaRotaryEmbedding.compute_default_rope_parameters(config, device=device)
    return ROPE_INIT_FUNCTIONS[rope_type]


def _hf_config(rope_scaling, head_dim=128, theta=500000.0, max_pos=131072):
    return LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
    )


CASES = [
    ("default", None, 128, 500000.0),
    ("default-64", None, 64, 10000.0),
    ("linear", {"rope_type": "linear", "factor": 4.0}, 128, 500000.0),
    ("llama3", LLAMA31_SCALING, 128, 500000.0),
    ("llama3-64", LLAMA31_SCALING, 64, 500000.0),
]
# UltraLong: factor 128 / 256 / 512 against Llama 3's 8K, with HF's beta_fast 32 and the paper's 4.
for s in (128.0, 256.0, 512.0):
    for beta_fast in (32.0, 4.0):
        CASES.append(
            (
                f"yarn-s{int(s)}-bf{int(beta_fast)}",
                {
                    "rope_type": "yarn",
                    "factor": s,
                    "original_max_position_embeddings": 8192,
                    "beta_fast": beta_fast,
                    "beta_slow": 1.0,
                },
                128,
                500000.0,
            )
        )
CASES += [
    ("yarn-no-truncate", {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                          "truncate": False}, 128, 10000.0),
    ("yarn-attention-factor", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                               "attention_factor": 1.25}, 64, 500000.0),
    ("yarn-mscale", {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                     "mscale": 0.707, "mscale_all_dim": 0.707}, 64, 10000.0),
    ("yarn-mscale-one-zero", {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                              "mscale": 1.0, "mscale_all_dim": 0.0}, 64, 10000.0),
    ("yarn-implicit-original", {"rope_type": "yarn", "factor": 4.0}, 128, 500000.0),
]


@pytest.mark.parametrize("name,scaling,head_dim,theta", CASES, ids=[c[0] for c in CASES])
def test_inv_freq_and_attention_factor_equal_transformers(name, scaling, head_dim, theta):
    hf = _hf_config(scaling, head_dim=head_dim, theta=theta, max_pos=8192 if "implicit" in name else 131072)
    rope_type = scaling["rope_type"] if scaling else "default"
    hf_inv, hf_af = _hf_rope_init(rope_type)(hf, torch.device("cpu"))

    ours = RopeConfig.from_hf(hf)
    inv, af = compute_rope_parameters(ours, head_dim)
    assert inv.dtype == torch.float32
    assert torch.equal(inv, hf_inv), (inv - hf_inv).abs().max()
    assert af == hf_af


def test_ultralong_attention_factors_match_paper_formula():
    for target, s in ((1 << 20, 128), (1 << 21, 256), (1 << 22, 512)):
        rope = yarn_for_context_length(target, beta_fast=4.0)
        assert rope.factor == s and rope.original_max_position_embeddings == 8192
        _, af = compute_rope_parameters(rope, 128)
        assert af == pytest.approx(0.1 * math.log(s) + 1, abs=0)
    assert compute_rope_parameters(yarn_for_context_length(1 << 20), 128)[1] == pytest.approx(1.4852030, abs=1e-7)


def test_yarn_keeps_high_and_divides_low_frequencies():
    rope = yarn_for_context_length(1 << 20, beta_fast=4.0)
    inv, _ = compute_rope_parameters(rope, 128)
    base, _ = compute_rope_parameters(RopeConfig(theta=500000.0), 128)
    # D(4) = 28.2 -> 28 and D(1) = 34.98 -> 35 (YaRN's correction range, arXiv 2309.00071): dims <= 28 kept, >= 35 divided by s.
    assert torch.equal(inv[:29], base[:29])
    torch.testing.assert_close(inv[35:], base[35:] / 128, rtol=1e-6, atol=0)
    assert ((inv[29:35] < base[29:35]) & (inv[29:35] > base[29:35] / 128)).all()
