"""Tiny random HF Llama checkpoints for the conversion tests (transformers is the reference).

Vocab 1003 (a multiple of nothing useful, so vocab padding is exercised), random norms (a norm in
the wrong slot shows), sharded safetensors with an index (max_shard_size small).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import transformers
from llama_helpers import tiny_llama, tiny_llama_config

VOCAB = 1003
SEQ = 48  # beyond original_max_position_embeddings=32 below, so RoPE scaling matters
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# The override used on import: YaRN for a 512-token target from a 32-token original, beta_fast=4.
YARN_TARGET, YARN_ORIGINAL, YARN_BETA_FAST = 512, 32, 4.0
# name -> (kv heads, tied, rope_scaling of the HF source, override RoPE with YaRN on import)
CASES = {
    "gqa-untied": (2, False, None, False),
    "mha-tied": (4, True, LLAMA3_ROPE, False),
    "gqa-untied-yarn": (2, False, LLAMA3_ROPE, True),
}


def hf_config(kv: int, tied: bool, rope_scaling: Optional[dict], max_pos: int = 256) -> transformers.LlamaConfig:
    return tiny_llama_config(VOCAB, kv, tied, rope_scaling, max_pos)


def make_hf_model(kv: int, tied: bool, rope_scaling: Optional[dict], seed: int = 0) -> transformers.LlamaForCausalLM:
    return tiny_llama(VOCAB, kv, tied, rope_scaling, max_position_embeddings=256, seed=seed)


def yarn_scaling() -> dict:
    return {"rope_type": "yarn", "factor": YARN_TARGET / YARN_ORIGINAL, "original_max_position_embeddings": YARN_ORIGINAL,
            "beta_fast": YARN_BETA_FAST, "beta_slow": 1.0}


def yarn_override():
    """The context extension the converter is asked for (what `--yarn-target 512 ...` builds)."""
    from megatron_ultralong.model.config import ContextExtension

    return ContextExtension(YARN_TARGET, YARN_ORIGINAL, beta_fast=YARN_BETA_FAST)


def tokens() -> torch.Tensor:
    """[2, SEQ] fixed token ids."""
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def write_cases(root: Path) -> dict[str, torch.Tensor]:
    """Save every case's HF model under root/hf_<case>; return the reference logits [2, SEQ, VOCAB]
    each converted model must reproduce (with the YaRN override: the same weights run by
    transformers under the YaRN config)."""
    ref = {}
    for case, (kv, tied, rope, override) in CASES.items():
        model = make_hf_model(kv, tied, rope)
        model.save_pretrained(root / f"hf_{case}", max_shard_size="60KB")
        if override:
            target = transformers.LlamaForCausalLM(hf_config(kv, tied, yarn_scaling(), YARN_TARGET)).eval()
            target.load_state_dict(model.state_dict())
            model = target
        with torch.no_grad():
            ref[case] = model(tokens()).logits
    return ref
