"""mu-train before launch: --help (no megatron import), --print-config, --dry-run on every shipped
recipe at its documented world size (the memory figure is training/memory.py's), and the model
architecture taken from a Megatron checkpoint alone."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from megatron_ultralong.config_io import from_dict, to_dict
from megatron_ultralong.training.cli import main
from megatron_ultralong.training.config import TrainConfig, load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "recipes", "*.yaml")))


def _world_size(path: str) -> int:
    return int(re.search(r"^# world size: (\d+)$", open(path).read(), re.M).group(1))


def _fake_checkpoint(model_dir, model_cfg) -> None:
    """A model directory as save_megatron_checkpoint leaves it, minus the tensors (the dry run reads
    only the metadata)."""
    from megatron_ultralong.checkpoint.torch_dist import CheckpointInfo

    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
    with open(os.path.join(model_dir, "ultralong_checkpoint.json"), "w") as f:
        json.dump(CheckpointInfo(model_config=model_cfg, params_dtype="bfloat16").to_json(), f)


def _yarn_8b(target: int):
    from megatron_ultralong.model.config import load_model_config
    from megatron_ultralong.rope import yarn_for_context_length

    cfg = load_model_config("llama3.1-8b")
    return cfg.replace(rope=yarn_for_context_length(target, theta=cfg.rope.theta, beta_fast=4.0, beta_slow=1.0),
                       max_position_embeddings=target)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """$WORK as the README's path layout has it after steps 1-3 (empty stand-ins for the big files)."""
    monkeypatch.chdir(tmp_path)
    for d in ("models/Llama-3.1-8B-Instruct", "data/ultralong_1b", "data/sft", "tiny_cpu_out/data"):
        os.makedirs(d)
    open("models/Llama-3.1-8B-Instruct/tokenizer.json", "w").close()
    for prefix in ("data/ultralong_1b/cpt_text_document", "tiny_cpu_out/data/tiny_text_document"):
        for ext in (".bin", ".idx"):
            open(prefix + ext, "w").close()
    open("data/sft/general_math_code.jsonl", "w").close()
    for size, target in (("1m", 1 << 20), ("2m", 1 << 21), ("4m", 1 << 22)):
        _fake_checkpoint(f"checkpoints/llama31_8b_yarn{size}", _yarn_8b(target))
    for size, target in (("1m", 1 << 20), ("2m", 1 << 21), ("4m", 1 << 22)):  # each size's CPT save directory
        _fake_checkpoint(f"checkpoints/ultralong_{size}/iter_0000125/model", _yarn_8b(target))
        with open(f"checkpoints/ultralong_{size}/latest", "w") as f:
            f.write("iter_0000125\n")
    return tmp_path


def _run(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_dry_run_every_recipe_at_its_world_size(work, capsys, recipe):
    from megatron_ultralong.training.memory_fit import estimate_memory_per_device
    from megatron_ultralong.training.model_source import resolve_model_config

    world = _world_size(recipe)
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", str(world))
    assert code == 0, out
    assert "dry run: OK" in out
    cfg = load_train_config(recipe)
    want = estimate_memory_per_device(resolve_model_config(cfg), cfg, cfg.check_world(world)).total / 2**30
    got = float(re.search(r"memory per GPU \(training/memory.py, estimate\): ([\d.]+) GiB", out).group(1))
    assert got == pytest.approx(want, abs=0.006)
    if cfg.train.peak_tflops:
        assert re.search(r"step time \(predicted.*\): [\d.]+\.\.[\d.]+ s/step", out)
    if cfg.model.megatron_checkpoint:  # the RoPE of the run is the converted checkpoint's YaRN
        sft_target = {"1m": 1 << 20, "2m": 1 << 21, "4m": 1 << 22}.get(os.path.basename(recipe)[11:13])
        assert "rope: yarn" in out and f"max positions {sft_target:,}" in out if "sft" in recipe else \
            f"max positions {cfg.data.seq_length:,}" in out


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_print_config_round_trips(capsys, recipe):
    code = main(["--config", recipe, "--print-config", "train.steps=17"])
    assert code is None
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = from_dict(TrainConfig, printed)
    assert cfg.train.steps == 17 and to_dict(cfg) == to_dict(load_train_config(recipe, ("train.steps=17",)))


def test_dry_run_names_each_problem(work, capsys):
    recipe = os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml")
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "250")
    assert code == 1 and "world size 250 is not divisible by TP*PP*CP" in out
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", "data.paths=[data/nope]")
    assert code == 4 and "missing input: data.paths[0]: data/nope.bin and data/nope.idx do not exist; written by " \
        "mu-build-dataset" in out
    # CP 2 instead of 16 on 16 GPUs without recompute: divisible, but 512K tokens per GPU cannot fit
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "16", "parallel.context_parallel=2",
                     "model.recompute=none")
    assert code == 1 and re.search(r"the memory estimate [\d.]+ GiB exceeds the device's 80 GiB", out)
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", "model.config=llama3.2-1b")
    assert code == 1 and "does not match the starting checkpoint: vocab_size" not in out and "hidden_size" in out
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256",
                     "train.tensorboard_dir=tb", "train.wandb_project=p")
    if "tensorboard" not in sys.modules and not _importable("tensorboard"):
        assert "pip install 'megatron-ultralong[tensorboard]'" in out and code == 1


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_megatron_checkpoint_alone_gives_the_architecture(work):
    from megatron_ultralong.training.model_source import resolve_model_config

    for path in ("checkpoints/ultralong_1m", "checkpoints/ultralong_1m/iter_0000125",
                 "checkpoints/ultralong_1m/iter_0000125/model"):
        cfg = load_train_config(None, ("data.paths=[x]", f"model.megatron_checkpoint={path}"))
        assert resolve_model_config(cfg) == _yarn_8b(1 << 20), path  # not the "tiny" default
    with pytest.raises(ValueError, match="model.megatron_checkpoint='checkpoints/none': no such file"):
        resolve_model_config(load_train_config(None, ("data.paths=[x]", "model.megatron_checkpoint=checkpoints/none")))


def test_help_and_config_errors_do_not_import_megatron(tmp_path):
    probe = (
        "import sys\n"
        "from megatron_ultralong.training.cli import main\n"
        "for argv in (['--help'], ['--config', sys.argv[1], 'train.bogus=1']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
        "print('loaded', sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'megatron'))\n"
    )
    recipe = os.path.join(ROOT, "examples", "recipes", "tiny_cpu.yaml")
    out = subprocess.run([sys.executable, "-c", probe, recipe], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    assert "exit 0" in out and "exit 2" in out
    assert "loaded []" in out, out[-500:]
    # --help documents every section and field from the dataclass docstrings
    flat = " ".join(out.split())
    assert "train.loss_chunk_tokens = 16384" in flat and "recomputed in backward" in flat
    assert "model.megatron_checkpoint" in out and "parallel.context_parallel" in out


def test_non_finite_or_negative_learning_rate_is_refused_by_the_dry_run_too(work, capsys):
    recipe = os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml")
    for value, why in ((".nan", "optim.lr=nan: expected a finite number"),
                       (".inf", "optim.lr=inf: expected a finite number"),
                       ("-0.001", "optim.lr=-0.001")):
        code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", f"optim.lr={value}")
        assert code == 2 and why in out, (value, out[-400:])
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", "optim.min_lr=.nan")
    assert code == 2 and "optim.min_lr=nan: expected a finite number" in out


def test_dry_run_plans_from_step_0(tmp_path, monkeypatch, capsys):
    """In an empty $WORK (README step 0) the plan comes from model.config + the YaRN target, the same
    figures memory.py gives for that architecture, and each missing input names its producer."""
    from megatron_ultralong.model.config import extend_context, load_model_config
    from megatron_ultralong.training.memory import estimate_memory
    from megatron_ultralong.training.step_time import step_time_range

    monkeypatch.chdir(tmp_path)
    recipe = os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml")
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256")
    assert code == 4, out
    cfg = load_train_config(recipe)
    planned = extend_context(load_model_config("llama3.1-8b"), cfg.data.seq_length)
    want = estimate_memory(cfg, 256, planned).total / 2**30
    got = float(re.search(r"memory per GPU \(training/memory.py, estimate\): ([\d.]+) GiB", out).group(1))
    assert got == pytest.approx(want, abs=0.006)
    fast, slow = step_time_range(cfg, 256, planned)
    assert f"{fast.seconds:.1f}..{slow.seconds:.1f} s/step" in out
    assert "rope: yarn" in out and f"max positions {cfg.data.seq_length:,}" in out
    assert "planned from model.config='llama3.1-8b'" in out
    missing = [ln for ln in out.splitlines() if ln.startswith("missing input: ")]
    assert len(missing) == 3, out
    assert "data.paths[0]" in missing[0] and "mu-build-dataset" in missing[0]
    assert "model.megatron_checkpoint: checkpoints/llama31_8b_yarn1m" in missing[2] and "mu-convert hf-to-mcore" in missing[2]
    assert "--local-dir models/Llama-3.1-8B-Instruct" in missing[1]
    # without a declared architecture there is nothing to plan with: an error, not a guess
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", "model.config=null")
    assert code == 1 and "declare the architecture" in out


def test_dry_run_step_time_is_memory_models(work, capsys):
    """One step-time formula: the dry run's seconds are training/memory.py's (recompute FLOPs
    included) at step_time.MFU_RANGE, the range docs/parallelism_plan.md quotes."""
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.dry_run import dry_run
    from megatron_ultralong.training.step_time import estimate_step_time
    from megatron_ultralong.training.step_time import MFU_RANGE

    recipe = os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml")
    cfg = load_train_config(recipe, ("model.recompute=full",))
    rep = dry_run(cfg, 256)
    want = tuple(estimate_step_time(cfg, 256, mfu).seconds for mfu in sorted(MFU_RANGE, reverse=True))
    assert rep.step_seconds == pytest.approx(want)
    lo, hi = min(MFU_RANGE), max(MFU_RANGE)
    plan = open(os.path.join(ROOT, "docs", "parallelism_plan.md"), encoding="utf-8").read()
    assert f"MFU {hi:.2f}–{lo:.2f}" in plan


def test_dry_run_fit_check_is_the_model_builders(work, capsys, tmp_path):
    """TP must divide the SwiGLU width too (model/config.py check_parallel_fits), not only the heads."""
    config = tmp_path / "odd_ffn.json"
    config.write_text(json.dumps({"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 175}))
    code, out = _run(capsys, "--dry-run", "--world-size", "2", "data.paths=[tiny_cpu_out/data/tiny_text_document]",
                     f"model.config={config}", "parallel.tensor_parallel=2")
    assert code == 1 and "parallel.tensor_parallel=2 does not divide ffn_hidden_size=175" in out


def test_dry_run_flags_gpu_only_settings_on_cpu(work, capsys):
    recipe = os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml")
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", "train.device=cpu",
                     "model.recompute=full")
    assert code == 1
    assert "error: train.device=cpu: sequence_parallel=True is GPU-only" in out
    assert "model.recompute" not in out.split("error:", 1)[1]  # recompute runs on CPU too
    code, out = _run(capsys, "--config", recipe, "--dry-run", "--world-size", "256", "train.device=cpu",
                     "parallel.sequence_parallel=false", "model.recompute=none")
    assert "GPU-only" not in out


def test_yarn_settings_are_spelled_as_the_model_config(capsys):
    """One spelling for the YaRN settings: model/config.py ContextExtension's fields, in the training
    config (model.yarn) and mu-convert (--yarn-*); the old spellings are refused with the new name."""
    from megatron_ultralong.convert.cli import main as convert_main
    from megatron_ultralong.model.config import ContextExtension

    cfg = load_train_config(None, ("data.paths=[x]", "model.yarn={target: 1024, original: 256, beta_fast: 4}"))
    assert cfg.model.yarn == ContextExtension(1024, 256, 4.0, 1.0)
    assert load_train_config(None, ("data.paths=[x]", "model.yarn=16384")).model.yarn == ContextExtension(16384)
    with pytest.raises(ValueError, match=r"model.yarn_target_length was renamed model.yarn.target"):
        load_train_config(None, ("data.paths=[x]", "model.yarn_target_length=1024"))
    with pytest.raises(ValueError, match="target=100 must exceed original=256"):
        load_train_config(None, ("data.paths=[x]", "model.yarn={target: 100, original: 256}"))
    for old, new in (("--rope-yarn-target", "--yarn-target"), ("--yarn-original-max-position", "--yarn-original")):
        with pytest.raises(SystemExit) as e:
            convert_main(["hf-to-mcore", "a", "b", old, "1024"])
        assert e.value.code == 2 and f"{old} was renamed {new}" in capsys.readouterr().err
