"""The one tiny random Llama the tests compare against (transformers' LlamaForCausalLM).

Defaults: 2 layers, H=64, 4 query heads of d=16, F=96, RoPE base 1e4. Norm weights are drawn in
[0.5, 1.5] (not ones) so a norm mapped to the wrong slot shows in the logits.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import transformers


def tiny_llama_config(vocab_size: int = 1003, kv_heads: int = 2, tied: bool = False,
                      rope_scaling: Optional[dict] = None, max_position_embeddings: int = 512,
                      **overrides: Any) -> transformers.LlamaConfig:
    """transformers.LlamaConfig of the tiny model; `overrides` are further LlamaConfig fields."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, intermediate_size=96, rope_theta=10000.0,
        rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def tiny_llama(vocab_size: int = 1003, kv_heads: int = 2, tied: bool = False, rope_scaling: Optional[dict] = None,
               max_position_embeddings: int = 512, seed: int = 0, weight_scale: float = 1.0,
               **overrides: Any) -> transformers.LlamaForCausalLM:
    """A seeded random tiny Llama in eval mode (fp32). weight_scale multiplies every non-norm
    weight (sharper logits keep greedy argmax far from ties)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size, kv_heads, tied, rope_scaling, max_position_embeddings, **overrides)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif weight_scale != 1.0:
                p.mul_(weight_scale)
    return model
