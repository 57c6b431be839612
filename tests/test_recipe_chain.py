"""The README recipe connects: each step's output, as the shipped files write it, is the next step's
input. The Slurm templates are executed with stand-ins for srun / scontrol / scancel that record
what would run, so the test reads the commands themselves, not comments."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

import pytest
import yaml

from megatron_ultralong.training.config import load_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "examples", "slurm")
SIZES = {"1m": 1 << 20, "2m": 1 << 21, "4m": 1 << 22}

STUB = """#!/bin/bash
printf '%s\\0' "$(basename "$0")" "$@" >> "$STUB_LOG"; printf '\\n' >> "$STUB_LOG"
if [ "$(basename "$0")" = srun ] && [ -n "${STUB_WAIT_FOR:-}" ]; then
  while [ ! -e "$STUB_WAIT_FOR" ]; do sleep 0.1; done
fi
if [ "$(basename "$0")" = scancel ] && [ -n "${STUB_WAIT_FOR:-}" ]; then touch "$STUB_WAIT_FOR"; fi
if [ "$(basename "$0")" = scontrol ] && [ "$1" = show ]; then echo node001; fi
exit 0
"""


def recipe(name: str):
    return load_train_config(os.path.join(ROOT, "examples", "recipes", name + ".yaml"))


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol", "scancel"):
        (bin_dir / tool).write_text(STUB)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), WORK=str(tmp_path),
               SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node001", SLURM_SUBMIT_DIR=str(tmp_path))
    return env, log


def calls(log) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("\0") for line in log.read_text().split("\0\n") if line]


def sbatch(stubs, script: str, **env) -> list[str]:
    """Run a template; return the command srun was asked to run (after srun's own --options)."""
    base, log = stubs
    subprocess.run(["bash", os.path.join(SLURM, script)], env=dict(base, **env), check=True, timeout=60)
    argv = next(c for c in calls(log) if c[0] == "srun")[1:]
    while argv[0].startswith("--"):
        argv = argv[1:]
    log.unlink()
    return argv


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_data_recipe_output_is_the_cpt_data_path():
    with open(os.path.join(ROOT, "examples", "data", "ultralong_1b.yaml")) as f:
        data = yaml.safe_load(f)
    for size in SIZES:
        assert recipe(f"llama31_8b_{size}").data.paths == (data["output"]["prefix"],)


def test_templates_chain_from_data_to_evaluation(stubs):
    from megatron_ultralong.convert.cli import build_parser as convert_parser

    data_cmd = sbatch(stubs, "build_dataset.sbatch")
    assert data_cmd[0] == "mu-build-dataset" and flag(data_cmd, "--config").endswith("examples/data/ultralong_1b.yaml")
    for size, target in SIZES.items():
        cpt = recipe(f"llama31_8b_{size}")
        conv = sbatch(stubs, "convert_hf_to_mcore.sbatch", SIZE=size)
        assert conv[:2] == ["mu-convert", "hf-to-mcore"]
        convert_parser().parse_args(conv[1:])  # every flag exists
        # the conversion's output is the training init, and it carries the YaRN of this context
        assert conv[3] == cpt.model.megatron_checkpoint
        assert int(flag(conv, "--yarn-target")) == cpt.data.seq_length == target
        assert (float(flag(conv, "--yarn-beta-fast")), float(flag(conv, "--yarn-beta-slow"))) == (4.0, 1.0)
        assert cpt.model.yarn is None  # training must not re-apply YaRN
        assert conv[2] == cpt.data.tokenizer  # the HF model directory, tokenizer included
        assert cpt.train.load == cpt.train.save
        train = sbatch(stubs, f"llama31_8b_{size}.sbatch")
        assert f"examples/recipes/llama31_8b_{size}.yaml" in flag(train, "--config")
        assert not any("=" in a and not a.startswith("-") for a in train[train.index("--config") + 2:]), \
            "the sbatch must run the recipe as written (no path overrides)"
    sft = recipe("llama31_8b_sft")
    assert sft.model.megatron_checkpoint == recipe("llama31_8b_1m").train.save  # CPT save dir -> SFT init
    assert sft.model.yarn is None
    export = sbatch(stubs, "export_hf.sbatch")
    assert export[:3] == ["mu-convert", "mcore-to-hf", sft.train.save] and "--verify" in export
    convert_parser().parse_args(export[1:])
    niah = sbatch(stubs, "eval_niah_1m.sbatch")
    assert flag(niah, "--model") == sft.train.save and "1048576" in niah
    readme = open(os.path.join(ROOT, "README.md")).read()
    for path in (recipe("llama31_8b_1m").model.megatron_checkpoint, sft.train.save, export[3], cpt.data.paths[0]):
        assert path in readme, path


def test_time_limit_signal_reaches_the_trainer_then_requeues(stubs, tmp_path):
    env, log = stubs
    done = tmp_path / "trainer_saved"
    proc = subprocess.Popen(["bash", os.path.join(SLURM, "llama31_8b_1m.sbatch")],
                            env=dict(env, STUB_WAIT_FOR=str(done)), stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not any(c[0] == "srun" for c in calls(log)) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` does
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    made = [c for c in calls(log) if c[0] in ("scancel", "scontrol") and c[1] != "show"]
    assert made == [["scancel", "--signal=USR1", "42"], ["scontrol", "requeue", "42"]]
    text = open(os.path.join(SLURM, "llama31_8b_1m.sbatch")).read()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text


def test_readme_recipe_commands_parse():
    """Every mu-* command in README's recipe block names a flag its CLI knows (argparse parses it)."""
    from megatron_ultralong.convert.cli import build_parser as convert_parser
    from megatron_ultralong.training.cli import build_parser as train_parser

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("## The real recipe", 1)[1].split("```")[1]
    joined = block.replace("\\\n", " ")
    seen = set()
    for line in joined.splitlines():
        argv = shlex.split(line.split("#", 1)[0]) if not line.lstrip().startswith("#") else []
        argv = argv[2:] if argv[:1] == ["cd"] and "&&" in argv else argv
        if not argv:
            continue
        if argv[0] == "mu-convert":
            convert_parser().parse_args(argv[1:])
        elif argv[0] == "mu-train":
            train_parser().parse_args(argv[1:])
        seen.add(argv[0])
    assert {"mu-convert", "mu-train", "sbatch"} <= seen
