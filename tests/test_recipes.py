"""examples/ recipes load through the real config schema, follow the paper's numbers (arXiv 2504.06214), and use the
recompute setting the memory model (training/memory.py, printed by benchmarks/memory_plan.py and
docs/parallelism_plan.md) picks for their Slurm layout."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from megatron_ultralong.training.config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_plan  # noqa: E402

CPT = {"llama31_8b_1m": 1 << 20, "llama31_8b_2m": 1 << 21, "llama31_8b_4m": 1 << 22}
SFT_STEPS = {"1m": 480, "2m": 140, "4m": 150}  # NVIDIA ADLR UltraLong page, "Instruction tuning"
PLAN = ("llama31_8b_1m", "llama31_8b_2m", "llama31_8b_4m") + tuple(f"llama31_8b_{s}_sft" for s in SFT_STEPS)


def _recipe(name: str):
    return load_train_config(os.path.join(ROOT, "examples", "recipes", name + ".yaml"))


def _nodes() -> int:
    text = open(os.path.join(ROOT, "examples", "slurm", "train.sbatch")).read()
    return int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))


@pytest.mark.parametrize("name", sorted(CPT))
def test_cpt_recipes_follow_the_paper(name):
    cfg = _recipe(name)
    m = cfg.model
    # YaRN (factor target / 8192, beta 4 / 1) is applied by the conversion that writes the starting
    # checkpoint (tests/test_recipe_chain.py reads it from the Slurm template); training keeps it.
    assert cfg.data.seq_length == CPT[name] and m.yarn is None
    assert m.config == "llama3.1-8b" and m.megatron_checkpoint and m.params_dtype == "bfloat16"
    assert cfg.optim.lr == 3e-5 and not cfg.data.document_mask and cfg.data.kind == "pretrain"
    # 1M: "125 iterations [...] global batch size of 8" (UltraLong-8B-1M model card); 4M: "150 iterations
    # [...] global batch size of 2" (4M model card); 2M: no card, the project's 125 x 4 (1M's budget).
    steps_gbs = {1 << 20: (125, 8), 1 << 21: (125, 4), 1 << 22: (150, 2)}[CPT[name]]
    assert (cfg.train.steps, cfg.train.global_batch_size) == steps_gbs
    assert 1.0e9 <= steps_gbs[0] * steps_gbs[1] * CPT[name] <= 1.3e9  # "1B tokens, one epoch"


@pytest.mark.parametrize("size", sorted(SFT_STEPS))
def test_sft_recipes_per_size(size):
    cfg, cpt = _recipe(f"llama31_8b_{size}_sft"), _recipe(f"llama31_8b_{size}")
    assert cfg.data.kind == "sft" and cfg.optim.lr == 5e-6 and cfg.data.pad_token_id == 128004
    assert cfg.train.steps == SFT_STEPS[size] and cfg.train.global_batch_size == 128  # batch 128 (paper)
    # Starts from this size's CPT save directory and saves to its own: no size resumes another's run.
    assert cfg.model.megatron_checkpoint == cpt.train.save and cfg.model.yarn is None
    assert cfg.train.save == cfg.train.load == f"checkpoints/ultralong_{size}_sft"
    assert cfg.data.seq_length >= 8192  # rows hold whole conversations (< 8K tokens each)
    others = {_recipe(f"llama31_8b_{s}_sft").train.save for s in SFT_STEPS if s != size}
    assert cfg.train.save not in others


def test_sft_1m_tokens_match_the_model_card():
    """~1B SFT tokens (UltraLong-8B-1M model card) in the project page's 480 steps."""
    cfg = _recipe("llama31_8b_1m_sft")
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_length
    assert 0.95e9 <= tokens <= 1.1e9, tokens


@pytest.mark.parametrize("name", sorted(PLAN))
def test_slurm_world_matches_recipe_and_memory_plan(name):
    cfg = _recipe(name)
    world = _nodes() * 8
    dp = cfg.check_world(world)
    assert cfg.train.global_batch_size == dp * cfg.train.micro_batch_size  # no accumulation at full scale
    _, lay = memory_plan.recipe(name)
    assert lay.world_size == world and lay.dp == dp
    # The recipe's recompute is the cheapest setting that fits the plan's budget.
    chosen = memory_plan.best_recompute(memory_plan.PRESETS["llama3.1-8b"], lay)
    assert chosen is not None and (chosen.recompute, chosen.recompute_modules) == (lay.recompute, lay.recompute_modules)
    assert memory_plan.total_gb(memory_plan.PRESETS["llama3.1-8b"], lay) <= memory_plan.USABLE_GB


def test_tiny_cpu_recipe_exercises_the_same_fields():
    tiny, full = _recipe("tiny_cpu"), _recipe("llama31_8b_1m")
    assert tiny.train.device == "cpu" and tiny.parallel.context_parallel == 2
    assert tiny.model.yarn.target > tiny.model.yarn.original
    for section in ("model", "parallel", "data", "optim", "train"):
        set_in_full = {k for k, v in vars(getattr(full, section)).items() if v is not None}
        set_in_tiny = {k for k, v in vars(getattr(tiny, section)).items() if v is not None}
        assert set_in_full - set_in_tiny <= {"megatron_checkpoint", "tokenizer", "peak_tflops", "load"}, section


def test_memory_plan_prints_from_the_memory_model():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_plan.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "Llama-3.1-8B: 8,030,261,248 parameters" in out
    for name in PLAN:
        assert f"\n{name}: seq" in out
    assert "TP8+SP: none 18,449" in out  # training/memory.py's derivation, not a second formula


@pytest.mark.parametrize("script", sorted(glob.glob(os.path.join(ROOT, "examples", "recipes", "*.sh"))
                                      + glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch"))
                                      + glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sh"))))
def test_launchers_parse_and_name_existing_recipes(script):
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    for name in re.findall(r"examples/recipes/(\w+)\.yaml", text) + re.findall(r"RECIPE=(llama\w+)", text):
        assert os.path.isfile(os.path.join(ROOT, "examples", "recipes", name + ".yaml")), name
    assert os.access(script, os.X_OK) or script.endswith((".sbatch", "common.sh"))


def test_one_training_template_and_one_node_launcher():
    """RECIPE= chooses the recipe: one Slurm training template, one torchrun launcher."""
    slurm = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch")))
    assert slurm == ["build_dataset.sbatch", "convert_hf_to_mcore.sbatch", "eval_niah_1m.sbatch", "export_hf.sbatch",
                     "train.sbatch"]
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "examples", "recipes", "*.sh"))) == \
        ["run_node.sh", "run_tiny_cpu.sh"]
