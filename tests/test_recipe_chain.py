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
if [ "$(basename "$0")" = srun ]; then exit "${STUB_SRUN_RC:-0}"; fi
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


def srun_argv(stubs, script: str, **env) -> list[str]:
    """Run a template; return srun's whole argument list."""
    base, log = stubs
    subprocess.run(["bash", os.path.join(SLURM, script)], env=dict(base, **env), check=True, timeout=60,
                   capture_output=True)
    argv = next(c for c in calls(log) if c[0] == "srun")[1:]
    log.unlink()
    return argv


def sbatch(stubs, script: str, **env) -> list[str]:
    """Run a template; return the command srun was asked to run (after srun's own --options)."""
    argv = srun_argv(stubs, script, **env)
    while argv[0].startswith("--"):
        argv = argv[1:]
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
    readme = open(os.path.join(ROOT, "README.md")).read()
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
        for name in (f"llama31_8b_{size}", f"llama31_8b_{size}_sft"):
            train = sbatch(stubs, "train.sbatch", RECIPE=name)
            assert flag(train, "--config").endswith(f"examples/recipes/{name}.yaml")
            assert not any("=" in a and not a.startswith("-") for a in train[train.index("--config") + 2:]), \
                "the sbatch must run the recipe as written (no path overrides)"
        # CPT save dir -> this size's SFT init; the SFT save dir -> export and NIAH of the same SIZE
        sft = recipe(f"llama31_8b_{size}_sft")
        assert sft.model.megatron_checkpoint == cpt.train.save and sft.model.yarn is None
        export = sbatch(stubs, "export_hf.sbatch", SIZE=size)
        assert export[:3] == ["mu-convert", "mcore-to-hf", sft.train.save] and "--verify" in export
        convert_parser().parse_args(export[1:])
        niah = sbatch(stubs, "eval_niah_1m.sbatch", SIZE=size)
        assert flag(niah, "--model") == sft.train.save
    assert "1048576" in sbatch(stubs, "eval_niah_1m.sbatch")
    sft = recipe("llama31_8b_1m_sft")
    export = sbatch(stubs, "export_hf.sbatch")
    for path in (recipe("llama31_8b_1m").model.megatron_checkpoint, sft.train.save, export[3], cpt.data.paths[0]):
        assert path in readme, path
    for text in ("RECIPE=llama31_8b_1m sbatch", "RECIPE=llama31_8b_1m_sft sbatch", "`SIZE=4m`", "`RECIPE=llama31_8b_4m`",
                 "`RECIPE=llama31_8b_4m_sft`"):  # the README's commands for 1M and its line for 2M / 4M
        assert text in readme, text


def test_niah_processes_follow_the_layout(stubs):
    """torchrun starts TP x CP processes (NPROC overrides), not a fixed 8."""
    niah = sbatch(stubs, "eval_niah_1m.sbatch", TP="1", CP="2")
    assert niah[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"] and flag(niah, "--cp") == "2"
    assert sbatch(stubs, "eval_niah_1m.sbatch")[3] == "8"
    assert sbatch(stubs, "eval_niah_1m.sbatch", NPROC="4", TP="2", CP="2")[3] == "4"


CONTAINER = ["--container-mounts={work}:{work}", "--container-workdir={work}", "--no-container-mount-home"]


@pytest.mark.parametrize("script", ["build_dataset.sbatch", "convert_hf_to_mcore.sbatch", "train.sbatch",
                                    "export_hf.sbatch", "eval_niah_1m.sbatch"])
def test_container_only_when_the_image_exists(stubs, tmp_path, script):
    env, _ = stubs
    work = str(tmp_path)
    # No image at the default path: no container flags, SRC = the clone the template lives in.
    argv = srun_argv(stubs, script)
    assert not any(a.startswith("--container") for a in argv), argv
    if script == "train.sbatch":
        assert flag(argv, "--config") == os.path.join(ROOT, "examples", "recipes", "llama31_8b_1m.yaml")
    # The default image present: pyxis as before, SRC inside the image.
    image = tmp_path / "megatron-ultralong.sqsh"
    image.write_bytes(b"")
    argv = srun_argv(stubs, script)
    assert f"--container-image={image}" in argv
    for opt in CONTAINER:
        assert opt.format(work=work) in argv
    if script == "train.sbatch":
        assert flag(argv, "--config") == "/opt/megatron-ultralong/examples/recipes/llama31_8b_1m.yaml"
        assert argv[0] == "--kill-on-bad-exit=1"
    # IMAGE=none or empty switches the container off even when the file exists; a missing path is an error.
    for value in ("none", ""):
        assert not any(a.startswith("--container") for a in srun_argv(stubs, script, IMAGE=value))
    bad = subprocess.run(["bash", os.path.join(SLURM, script)], env=dict(env, IMAGE=str(tmp_path / "typo.sqsh")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "typo.sqsh: no such image" in bad.stderr
    # A registry reference is pyxis's to pull.
    assert "--container-image=nvcr.io#nvidia/pytorch:25.09-py3" in \
        srun_argv(stubs, script, IMAGE="nvcr.io#nvidia/pytorch:25.09-py3")


def test_no_container_runs_the_clones_code(stubs):
    """Without a container the job imports the package from the clone whose recipes it runs."""
    env, _ = stubs
    out = subprocess.run(["bash", "-c", f"source {SLURM}/common.sh; mu_setup {SLURM}; echo $SRC; echo $PYTHONPATH;"
                                        " echo $PYTORCH_CUDA_ALLOC_CONF"],
                         env=dict(env, PYTHONPATH="/elsewhere"), capture_output=True, text=True, check=True)
    src, pythonpath, alloc = out.stdout.splitlines()[-3:]
    assert src == ROOT and pythonpath == f"{ROOT}:/elsewhere" and alloc == "expandable_segments:True"


@pytest.mark.parametrize("trainer_rc,requeued", [(75, True), (143, True), (0, False)])
def test_time_limit_signal_reaches_the_trainer_then_requeues(stubs, tmp_path, trainer_rc, requeued):
    """USR1 is forwarded to the job step; a step that stopped after it (75 saved, or 143: srun's
    --kill-on-bad-exit ended the other ranks after the first one's 75) is requeued and the script
    exits 0; a step that had finished anyway (0) is not requeued."""
    env, log = stubs
    done = tmp_path / "trainer_saved"
    proc = subprocess.Popen(["bash", os.path.join(SLURM, "train.sbatch")],
                            env=dict(env, STUB_WAIT_FOR=str(done), STUB_SRUN_RC=str(trainer_rc)),
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not any(c[0] == "srun" for c in calls(log)) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@1200` does
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    made = [c for c in calls(log) if c[0] in ("scancel", "scontrol") and c[1] != "show"]
    assert made == [["scancel", "--signal=USR1", "42"]] + ([["scontrol", "requeue", "42"]] if requeued else [])
    text = open(os.path.join(SLURM, "train.sbatch")).read()
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
