"""cos/sin from global position ids equal HF's LlamaRotaryEmbedding, up to 4M positions."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron_ultralong.rope import RopeConfig
from megatron_ultralong.rope.embedding import RotaryAngles

SCALINGS = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn-4m": {"rope_type": "yarn", "factor": 512.0, "original_max_position_embeddings": 8192,
                "beta_fast": 4.0, "beta_slow": 1.0},
    "yarn-1m": {"rope_type": "yarn", "factor": 128.0, "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_cos_sin_match_hf_up_to_4m(name):
    hf_cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, rope_theta=500000.0,
                         rope_scaling=SCALINGS[name], max_position_embeddings=1 << 22)
    hf = LlamaRotaryEmbedding(hf_cfg)
    ours = RotaryAngles(RopeConfig.from_hf(hf_cfg), 128)
    # Positions spread over [0, 4M): the last one is 4,194,303.
    pos = torch.cat([torch.arange(0, 64), torch.randint(0, 1 << 22, (448,)), torch.tensor([(1 << 22) - 1])])
    pos = pos[None, :]
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = hf(x, pos)  # [b, s, d], already multiplied by attention_scaling
    angles = ours(pos)  # [s, b, 1, d]
    cos = (torch.cos(angles) * ours.attention_factor)[:, :, 0].transpose(0, 1)
    sin = (torch.sin(angles) * ours.attention_factor)[:, :, 0].transpose(0, 1)
    # Same fp32 angles, same torch.cos: identical bits.
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    assert ours.attention_factor == hf.attention_scaling


def test_angles_follow_position_ids_not_sequence_index():
    ours = RotaryAngles(RopeConfig(theta=10000.0), 8)
    pos = torch.tensor([[5, 6, 7, 0, 1], [100, 101, 102, 103, 104]])
    angles = ours(pos)
    assert angles.shape == (5, 2, 1, 8)
    assert torch.equal(angles[3, 0, 0], torch.zeros(8))  # a restarted document is at position 0
    assert torch.equal(angles[:, 1], ours(pos[1:])[:, 0])  # rows are independent
    with pytest.raises(ValueError, match=r"position_ids must be \[b, s\]"):
        ours(torch.arange(4))
