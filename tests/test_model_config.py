"""LlamaConfig from HF configs and presets; configs the model can't represent are refused clearly."""
import json

import pytest
import transformers

from megatron_ultralong.model import PRESETS, LlamaConfig, load_model_config


def _hf(**kw):
    base = dict(vocab_size=1003, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96)
    base.update(kw)
    return transformers.LlamaConfig(**base).to_dict()


def test_from_hf_and_back_through_transformers():
    hf = _hf(rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=1 << 20,
             rope_scaling={"rope_type": "yarn", "factor": 128.0, "original_max_position_embeddings": 8192})
    cfg = LlamaConfig.from_hf(hf)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (2, 16, True)
    again = LlamaConfig.from_hf(transformers.LlamaConfig(**cfg.to_hf()))
    assert again == cfg


def test_presets_have_the_published_shapes():
    p8 = PRESETS["llama3.1-8b"]
    # 8.03B parameters for Llama-3.1-8B (untied): embeddings + 32 layers + norm + lm_head.
    layer = (p8.hidden_size * (p8.num_attention_heads + 2 * p8.num_kv_heads) * p8.head_dim
             + p8.num_attention_heads * p8.head_dim * p8.hidden_size
             + 3 * p8.hidden_size * p8.ffn_hidden_size + 2 * p8.hidden_size)
    total = 2 * p8.vocab_size * p8.hidden_size + p8.num_layers * layer + p8.hidden_size
    assert total == 8_030_261_248
    assert PRESETS["llama3.2-1b"].tie_word_embeddings
    assert PRESETS["llama3.1-70b"].num_layers == 80


@pytest.mark.parametrize("changes,match", [
    (dict(num_key_value_heads=3), r"num_key_value_heads=3 does not divide num_attention_heads=4"),
    (dict(model_type="mistral"), r"model_type='mistral'.*only Llama"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(attention_bias=True), r"attention_bias=True"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type='dynamic' is not supported"),
])
def test_unrepresentable_configs_raise(changes, match):
    hf = _hf()
    hf.update(changes)
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(hf)


def test_missing_field_and_bad_values():
    hf = _hf()
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match=r"config field 'intermediate_size' is missing"):
        LlamaConfig.from_hf(hf)
    with pytest.raises(ValueError, match=r"LlamaConfig.hidden_size=0"):
        PRESETS["tiny"].replace(hidden_size=0)


def test_load_model_config(tmp_path):
    assert load_model_config("tiny") is PRESETS["tiny"]
    (tmp_path / "config.json").write_text(json.dumps(_hf()))
    assert load_model_config(str(tmp_path)).vocab_size == 1003
    (tmp_path / "bad.json").write_text('{"vocab_size": 3,\n  oops}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 2"):
        load_model_config(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"not a preset"):
        load_model_config(str(tmp_path / "nope"))


@pytest.mark.parametrize("target", [1 << 20, 1 << 16])  # above and below the model's 128K
def test_extend_context_reads_back_in_transformers_as_the_target(target, monkeypatch):
    """transformers takes max_position_embeddings as YaRN's post-extension length and warns when
    max_position_embeddings / original != factor; the extended config must read back warning-free,
    with transformers' inverse frequencies equal to ours."""
    import torch
    from transformers import modeling_rope_utils

    from megatron_ultralong.model.config import extend_context
    from megatron_ultralong.rope import compute_rope_parameters

    warnings = []
    monkeypatch.setattr(modeling_rope_utils.logger, "warning_once", warnings.append)
    monkeypatch.setattr(modeling_rope_utils.logger, "warning", warnings.append)
    cfg = extend_context(PRESETS["llama3.1-8b"], target, original=8192, beta_fast=4.0, beta_slow=1.0)
    assert cfg.max_position_embeddings == target and cfg.rope.factor == target / 8192
    assert cfg.rope.theta == PRESETS["llama3.1-8b"].rope.theta
    hf = transformers.LlamaConfig(**cfg.to_hf())
    assert warnings == []
    hf_inv_freq, hf_factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv_freq, factor = compute_rope_parameters(cfg.rope, cfg.head_dim)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), rtol=0, atol=0)
    assert factor == pytest.approx(hf_factor)
    assert LlamaConfig.from_hf(hf) == cfg
