"""RopeConfig: HF rope_scaling round trips, and bad input names the field and value."""
import pytest
from transformers import LlamaConfig as HFLlamaConfig

from megatron_ultralong.rope import RopeConfig, compute_rope_parameters, yarn_for_context_length

YARN_1M = {"rope_type": "yarn", "factor": 128.0, "original_max_position_embeddings": 8192,
           "beta_fast": 4.0, "beta_slow": 1.0}


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    YARN_1M,
    dict(YARN_1M, attention_factor=1.3, truncate=False),
])
def test_hf_round_trip(scaling):
    rope = RopeConfig.from_hf({"rope_theta": 500000.0, "rope_scaling": scaling, "max_position_embeddings": 1 << 20})
    theta, out = rope.to_hf()
    assert theta == 500000.0
    assert out == scaling
    assert RopeConfig.from_hf({"rope_theta": theta, "rope_scaling": out}) == rope
    # transformers accepts what we write and computes the same frequencies from it.
    HFLlamaConfig(rope_theta=theta, rope_scaling=out, max_position_embeddings=1 << 20)


def test_legacy_type_key_and_transformers5_rope_parameters():
    legacy = RopeConfig.from_hf({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert legacy == RopeConfig(rope_type="linear", theta=1e4, factor=4.0)
    v5 = RopeConfig.from_hf({"rope_parameters": dict(YARN_1M, rope_theta=500000.0)})
    assert v5 == RopeConfig.from_hf({"rope_theta": 500000.0, "rope_scaling": YARN_1M})


def test_yarn_defaults_follow_hf_truthiness():
    # HF reads beta_fast/beta_slow with `or default` and falls back to max_position_embeddings.
    rope = RopeConfig.from_hf({"rope_theta": 1e4, "max_position_embeddings": 4096,
                               "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": None, "beta_slow": 0}})
    assert (rope.beta_fast, rope.beta_slow, rope.original_max_position_embeddings) == (32.0, 1.0, 4096)


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, r"rope_scaling.rope_type='ntk-by-parts' is not supported"),
    ({"factor": 2.0}, r"missing field 'rope_type'"),
    ({"rope_type": "yarn"}, r"rope_scaling.factor is required for rope_type='yarn'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
     r"rope_scaling.high_freq_factor is required"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 4.0}, r"rope_scaling.beta_fast=4.0 is not a field"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8192}, r"RopeConfig.factor=0.5"),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "beta_fast": 1.0, "beta_slow": 2.0},
     r"RopeConfig.beta_fast=1.0"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8192}, r"RopeConfig.high_freq_factor=1.0"),
])
def test_bad_rope_scaling_names_the_field(scaling, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig.from_hf({"rope_theta": 1e4, "rope_scaling": scaling})


def test_direct_construction_validates():
    with pytest.raises(ValueError, match=r"RopeConfig.rope_type='dynamic'"):
        RopeConfig(rope_type="dynamic")
    with pytest.raises(ValueError, match=r"RopeConfig.original_max_position_embeddings=None"):
        RopeConfig(rope_type="yarn", factor=4.0)
    with pytest.raises(ValueError, match=r"rotary dim=7"):
        compute_rope_parameters(RopeConfig(), 7)


def test_yarn_for_context_length():
    rope = yarn_for_context_length(4 * 1024 * 1024, beta_fast=4.0)
    assert rope.factor == 512.0 and rope.beta_fast == 4.0 and rope.theta == 500000.0
    _, scaling = rope.to_hf()
    assert scaling["factor"] * scaling["original_max_position_embeddings"] == 4 * 1024 * 1024
    with pytest.raises(ValueError, match=r"target_length=4096 must exceed"):
        yarn_for_context_length(4096)
