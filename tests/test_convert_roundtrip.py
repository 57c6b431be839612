"""HF <-> Megatron conversion at TP=1/2, PP=1/2 and DP=2 on gloo processes, against transformers.

- hf-to-mcore, loaded into the plugin's model at the same and at other layouts (megatron resharding):
  logits equal transformers' within 1e-5 in fp32 (GQA and MHA, tied and untied, vocab 1003, a YaRN
  override on import); vocab padding rows are zero.
- Megatron -> HF -> Megatron is bit-exact, and HF -> Megatron -> HF reproduces every HF tensor.
- The exported directory loads with AutoModelForCausalLM, carries the YaRN rope_scaling and matches.
Tied models are not run at PP=2: megatron-core's tied-embedding sync at PP>1 calls `.cuda()`
(language_module.py `setup_embeddings_and_output_layer`), which a CPU build cannot do.
"""
import json

import torch
import transformers
from safetensors.torch import load_file

from convert_fixtures import CASES, VOCAB, tokens, write_cases, yarn_override
from dist_utils import run_distributed

TOL = 1e-5


def _load_model(path, rt):
    from megatron_ultralong.checkpoint.torch_dist import load_megatron_checkpoint, read_checkpoint_info
    from megatron_ultralong.convert.hf_to_mcore import build_stage

    info = read_checkpoint_info(path)
    model = build_stage(info.model_config, rt, info.torch_dtype, info.vocab_divisible_by)
    load_megatron_checkpoint(model, path)
    return model


def _check_logits(model, rt, ref, what):
    from megatron_ultralong.convert.verify import megatron_logits

    logits = megatron_logits(model, tokens(), rt)
    if rt.rank == 0:
        diff = (logits - ref).abs().max().item()
        assert diff <= TOL, f"{what}: max |logit diff| vs transformers {diff}"


def _check_padding_rows_zero(model, rt, what):
    if not model.pre_process:
        return
    w = model.embedding.word_embeddings.weight  # [V_pad / TP, H], this TP rank's rows
    start = rt.pg_collection.tp.rank() * w.shape[0]
    pad = torch.arange(start, start + w.shape[0]) >= VOCAB
    assert pad.any() or start + w.shape[0] <= VOCAB
    assert torch.all(w[pad] == 0), f"{what}: vocab padding rows are not zero"


def _assert_same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    for k in sa:
        if k.endswith("_extra_state"):
            continue
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


def _layout(rank, world_size, tp, pp, root, src_layout, tag):
    """Import every case here; reload a checkpoint written at `src_layout`; export it and re-import."""
    from megatron_ultralong.convert.hf_to_mcore import convert_hf_to_mcore
    from megatron_ultralong.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime

    rt = init_runtime(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), device="cpu")
    ref = torch.load(f"{root}/ref.pt")
    for case, (_, tied, _, override) in CASES.items():
        if tied and pp > 1:
            continue
        context = yarn_override() if override else None
        mc = f"{root}/mc_{tag}_{case}"
        _, report = convert_hf_to_mcore(f"{root}/hf_{case}", mc, rt, context=context, progress=False, verify=True)
        if rank == 0:
            assert report.max_abs_logit_diff <= TOL and report.argmax_agreement == 1.0, (case, report)
        model = _load_model(mc, rt)
        _check_logits(model, rt, ref[case], f"{tag} {case}")
        _check_padding_rows_zero(model, rt, f"{tag} {case}")
        if src_layout is None:
            continue
        # A checkpoint written at another TP/PP, resharded on load.
        src = f"{root}/mc_{src_layout}_{case}"
        model = _load_model(src, rt)
        _check_logits(model, rt, ref[case], f"{src_layout} -> {tag} {case}")
        # Megatron -> HF -> Megatron, bit-exact.
        hf_out = f"{root}/hfout_{tag}_{case}"
        _, report = convert_mcore_to_hf(src, hf_out, rt, max_shard_size="50KB", progress=False, verify=True)
        if rank == 0:
            assert report.max_abs_logit_diff <= TOL and report.argmax_agreement == 1.0, (case, report)
        convert_hf_to_mcore(hf_out, f"{root}/mc2_{tag}_{case}", rt, progress=False)
        _assert_same_weights(model, _load_model(f"{root}/mc2_{tag}_{case}", rt), f"{tag} {case} round trip")
    if src_layout is not None and pp == 1:
        # dtype chosen on export: bf16 safetensors, torch_dtype in config.json.
        convert_mcore_to_hf(f"{root}/mc_{src_layout}_gqa-untied", f"{root}/hfbf16_{tag}", rt, dtype=torch.bfloat16,
                            progress=False)


def test_convert_both_ways_at_tp_pp_dp_matches_transformers(tmp_path):
    ref = write_cases(tmp_path)
    torch.save(ref, tmp_path / "ref.pt")
    run_distributed(_layout, world_size=2, args=(2, 1, str(tmp_path), None, "tp2"))
    run_distributed(_layout, world_size=4, args=(2, 2, str(tmp_path), "tp2", "tp2pp2"))
    run_distributed(_layout, world_size=2, args=(1, 1, str(tmp_path), "tp2", "dp2"))

    for tag in ("tp2pp2", "dp2"):
        for case, (_, tied, _, override) in CASES.items():
            if tied and tag == "tp2pp2":
                continue
            out = tmp_path / f"hfout_{tag}_{case}"
            cfg = json.loads((out / "config.json").read_text())
            expected_rope = "yarn" if override else (cfg["rope_scaling"] or {}).get("rope_type")
            assert (cfg["rope_scaling"] or {}).get("rope_type") == expected_rope
            if override:
                assert cfg["rope_scaling"]["beta_fast"] == 4.0 and cfg["max_position_embeddings"] == 512
            assert (out / "model.safetensors.index.json").is_file() and (out / "generation_config.json").is_file()
            hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                diff = (hf(tokens()).logits - ref[case]).abs().max().item()
            assert diff <= TOL, f"exported {tag} {case}: {diff}"
            # HF -> Megatron -> HF reproduces the source tensors exactly (names, shapes, values).
            src = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{case}", dtype=torch.float32)
            exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
            source = {k: v for k, v in src.state_dict().items() if not (tied and k == "lm_head.weight")}
            assert exported.keys() == source.keys(), (tag, case)
            for k, v in source.items():
                assert torch.equal(exported[k], v), f"{tag} {case}: {k}"

    bf16 = tmp_path / "hfbf16_dp2"
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = {k: v for f in bf16.glob("*.safetensors") for k, v in load_file(f).items()}
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}


def test_token_ids_survive_hf_to_megatron_to_hf(tmp_path):
    """pad_token_id (and bos/eos) come back in the exported config.json, read by transformers."""
    from convert_fixtures import make_hf_model
    from megatron_ultralong.convert.cli import main

    hf = make_hf_model(kv=2, tied=False, rope_scaling=None)
    hf.config.pad_token_id, hf.config.bos_token_id, hf.config.eos_token_id = 7, 1, [2, 5]
    hf.save_pretrained(tmp_path / "hf")
    assert main(["hf-to-mcore", str(tmp_path / "hf"), str(tmp_path / "mc"), "--no-progress"]) == 0
    assert main(["mcore-to-hf", str(tmp_path / "mc"), str(tmp_path / "out"), "--no-progress"]) == 0
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (back.pad_token_id, back.bos_token_id, back.eos_token_id) == (7, 1, [2, 5])
