"""mu-convert takes what the other tools write, and --verify can be trusted: a transformers 5
`rope_parameters` config is compared with the RoPE the conversion used, and a wrong conversion
exits non-zero."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert_fixtures import make_hf_model, yarn_scaling
from megatron_ultralong.convert.cli import VERIFY_FAILED, main


def _as_transformers5_config(path) -> None:
    """Rewrite config.json the way transformers 5 saves it: RoPE (theta included) only in
    `rope_parameters`, dtype as `dtype`; no `rope_theta` / `rope_scaling` / `torch_dtype`."""
    cfg = json.loads((path / "config.json").read_text())
    theta = cfg.pop("rope_theta", None) or cfg["rope_parameters"]["rope_theta"]
    scaling = cfg.pop("rope_scaling", None) or {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    cfg["rope_parameters"] = {**scaling, "rope_theta": theta}
    cfg["dtype"] = cfg.pop("torch_dtype", None) or cfg.get("dtype") or "float32"
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def hf5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf5") / "tiny_yarn"
    make_hf_model(kv=2, tied=False, rope_scaling=yarn_scaling()).save_pretrained(path)
    _as_transformers5_config(path)
    return path


def test_transformers5_config_verifies_exactly_and_save_dirs_export(hf5_dir, tmp_path, capsys):
    # A training save directory as the trainer lays it out: <save>/iter_*/model and `latest`.
    save = tmp_path / "run"
    model_dir = save / "iter_0000005" / "model"
    model_dir.parent.mkdir(parents=True)
    assert main(["hf-to-mcore", str(hf5_dir), str(model_dir), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # Compared with the YaRN the converter read from rope_parameters (transformers 4.x alone would
    # read the default RoPE from this file and report a large difference).
    assert "argmax agreement = 100.00%" in out and "-> OK" in out, out
    (save / "latest").write_text("iter_0000005\n")
    for i, src in enumerate((save, save / "iter_0000005")):
        dst = tmp_path / f"hf_{i}"
        assert main(["mcore-to-hf", str(src), str(dst), "--verify", "--no-progress"]) == 0
        assert "-> OK" in capsys.readouterr().out
        exported = json.loads((dst / "config.json").read_text())
        # written for both transformers lines, the same RoPE in each spelling
        assert exported["rope_scaling"]["rope_type"] == exported["rope_parameters"]["rope_type"] == "yarn"
        assert exported["rope_parameters"]["rope_theta"] == exported["rope_theta"] == 10000.0
        back, source = load_file(dst / "model.safetensors"), load_file(hf5_dir / "model.safetensors")
        assert back.keys() == source.keys() and all(torch.equal(back[k], v) for k, v in source.items())
    assert main(["mcore-to-hf", str(tmp_path / "hf_0"), str(tmp_path / "x")]) == 2  # an HF directory
    assert "not a Megatron checkpoint" in capsys.readouterr().err


def test_wrong_conversion_exits_non_zero(hf5_dir, tmp_path, capsys, monkeypatch):
    import megatron_ultralong.convert.mcore_to_hf as m2h

    mc = tmp_path / "mc"
    assert main(["hf-to-mcore", str(hf5_dir), str(mc), "--no-progress"]) == 0
    real = m2h.write_hf_stage

    def swapped_layers(model, cfg, runtime, checkpoint, out_dir, *rest, **kw):
        """A converter bug: layer 0's and layer 1's MLP down-projections trade places."""
        out = real(model, cfg, runtime, checkpoint, out_dir, *rest, **kw)
        for shard, _ in out[0]:  # (temporary shard name, tensor names)
            shard = out_dir / shard
            tensors = load_file(shard)
            a, b = (f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1))
            if a in tensors and b in tensors:
                tensors[a], tensors[b] = tensors[b], tensors[a]
                save_file(tensors, shard, metadata={"format": "pt"})
        return out

    monkeypatch.setattr(m2h, "write_hf_stage", swapped_layers)
    assert main(["mcore-to-hf", str(mc), str(tmp_path / "bad"), "--verify", "--no-progress"]) == VERIFY_FAILED
    captured = capsys.readouterr()
    assert "-> FAILED (tolerance 1.0e-03)" in captured.out
    assert "mu-convert: error: verification failed" in captured.err
    # the same export with a tolerance wide enough passes: the flag is honoured
    shutil.rmtree(tmp_path / "bad")
    assert main(["mcore-to-hf", str(mc), str(tmp_path / "bad"), "--verify", "--verify-tol", "1e9",
                 "--no-progress"]) == 0


def test_export_verifies_at_the_exported_dtype(hf5_dir, tmp_path, capsys):
    """An fp32 checkpoint exported with --dtype bf16 is compared in bf16 (both sides), at bf16's
    tolerance: comparing the bf16 files with the fp32 model would fail on rounding alone."""
    mc = tmp_path / "mc"
    assert main(["hf-to-mcore", str(hf5_dir), str(mc), "--no-progress"]) == 0
    assert main(["mcore-to-hf", str(mc), str(tmp_path / "hf"), "--dtype", "bf16", "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16): max |logit diff|" in out and "-> OK (tolerance 5.0e-01)" in out, out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "hf" / "model.safetensors").values())


def test_mcore_dir_errors_name_the_argument(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["mcore-to-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "MCORE_DIR=" in capsys.readouterr().err
    (tmp_path / "save").mkdir()
    (tmp_path / "save" / "latest").write_text("iter_0000009\n")
    assert main(["mcore-to-hf", str(tmp_path / "save"), str(tmp_path / "out")]) == 2
    assert "latest names iter_0000009, which does not exist" in capsys.readouterr().err
