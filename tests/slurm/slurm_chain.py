"""`make test-slurm`: the README recipe through the real Slurm templates, on a one-node Slurm.

What a cluster user does, at toy size: in a fresh $WORK, with a tiny Llama-3-style model standing in
for Llama-3.1-8B-Instruct at models/Llama-3.1-8B-Instruct (a random 2-layer model and the toy
Llama-3 tokenizer of examples/data/), and tiny versions of the shipped recipes that keep every path
of the real ones (tests/slurm/assets.py), submit

  build_dataset.sbatch -> convert_hf_to_mcore.sbatch -> mu-prepare-sft (AceMath-Instruct layout)
  -> train.sbatch (1M CPT, 2 tasks, CPU/gloo) -> train.sbatch (1M SFT) -> export_hf.sbatch --verify
  -> eval_niah_1m.sbatch -> the 4M CPT and SFT in the same $WORK

with `sbatch` as the README writes it (no container: IMAGE is unset and $WORK has no image), only
the allocation overridden for a 2-CPU node without GPUs, and checks each step's output. Then one CPT
job receives the time-limit signal (its limit is lowered once training runs), saves, requeues itself
and finishes; its losses must equal the uninterrupted 1M CPT's, step for step (an exact resume).

The Slurm daemons (tests/slurm/cluster.sh) run from a scratch directory and are stopped by PID at
the end; the scratch directory is removed. Needs root the first time (apt-get install slurm-wlm
munge). The last line is the summary, "N passed, M failed"; the exit status is 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import assets  # noqa: E402

TEMPLATES = REPO / "examples" / "slurm"
SMALL_NODE = ["--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0", "--oversubscribe"]
"""The templates ask for whole 8-GPU nodes; on this node the allocation is overridden on the command
line (`--oversubscribe` lifts the templates' --exclusive, so the requeue test runs beside the chain)."""
JOB_TIMEOUT_S = 240
WAITING = ("None", "Priority", "Resources", "BeginTime")
"""Reasons a pending job will start; any other (PartitionConfig, ...) means it never will."""


class Report:
    """Counts checks; `buffered` collects a background thread's lines to print after it joins."""

    def __init__(self, buffered: bool = False) -> None:
        self.passed = 0
        self.failed = 0
        self.lines: list[str] | None = [] if buffered else None

    def say(self, line: str) -> None:
        if self.lines is None:
            print(line, flush=True)
        else:
            self.lines.append(line)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.say(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail and not ok else ""))
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok


class Slurm:
    """The one-node cluster: start, submit, wait; stop by the PIDs it recorded."""

    def __init__(self, scratch: Path, work: Path) -> None:
        self.dir = scratch / "slurm"
        self.work = work
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"), OMP_NUM_THREADS="1",
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
                        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        for key in ("IMAGE", "SRC", "VENV", "RECIPE", "SIZE", "PYTHONPATH"):
            self.env.pop(key, None)

    def _bash(self, fn: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f'source "{HERE}/cluster.sh" && {fn} "{self.dir}"'],
                              env=self.env, text=True, capture_output=True)

    def up(self) -> subprocess.CompletedProcess:
        return self._bash("slurm_up")

    def down(self) -> None:
        self._bash("slurm_down")

    def sbatch(self, template: str, *args: str, options: tuple[str, ...] = (), **env: str) -> str:
        """Submit a template from $WORK as the README does; return the job id."""
        cmd = ["sbatch", "--parsable", f"--output={self.work}/logs/%x-%j.out", *SMALL_NODE, *options,
               str(TEMPLATES / template), *args]
        out = subprocess.run(cmd, cwd=self.work, env=dict(self.env, **env), text=True, capture_output=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {template}: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (the finished job stays listed for MinJobAge)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, text=True,
                             capture_output=True).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def scontrol(self, *args: str) -> None:
        subprocess.run(["scontrol", *args], env=self.env, check=True, capture_output=True)

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        """Poll until the job has finished (squeue's back-off in `sbatch --wait` costs up to ~30 s)."""
        start = time.time()
        while time.time() < start + timeout:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") not in WAITING and time.time() > start + 10:
                subprocess.run(["scancel", job_id], env=self.env)  # it would never start
                return dict(info, JobState=f"PENDING({info.get('Reason')})")
            time.sleep(0.3)
        subprocess.run(["scancel", job_id], env=self.env)
        return dict(self.job(job_id), JobState="TIMEOUT(test)")

    def log(self, info: dict) -> str:
        path = Path(info.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else ""


def run_job(slurm: Slurm, report: Report, name: str, template: str, *args: str, **kw) -> tuple[bool, str]:
    t0 = time.time()
    job_id = slurm.sbatch(template, *args, **kw)
    info = slurm.wait(job_id)
    log = slurm.log(info)
    ok = info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0"
    tail = "\n".join(log.splitlines()[-15:])
    report.check(f"{name}: job {job_id} {info.get('JobState')} exit {info.get('ExitCode')} ({time.time() - t0:.0f} s)",
                 ok, tail)
    return ok, log


def metrics(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def latest(save: Path) -> str:
    pointer = save / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


def chain(slurm: Slurm, report: Report, work: Path) -> None:
    real = assets.real_recipes()
    recipes = assets.write_all(work, real)
    cpt1, sft1 = real["llama31_8b_1m"], real["llama31_8b_1m_sft"]

    print("[1] dataset", flush=True)
    ok, _ = run_job(slurm, report, "build_dataset.sbatch", "build_dataset.sbatch", RECIPE=str(recipes["data"]))
    prefix = work / cpt1["data"]["paths"][0]
    report.check(f"dataset at the CPT recipes' data.paths ({cpt1['data']['paths'][0]})",
                 prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file())

    print("[2] convert (SIZE=1m)", flush=True)
    ok, log = run_job(slurm, report, "convert_hf_to_mcore.sbatch", "convert_hf_to_mcore.sbatch", "--dtype", "fp32",
                      SIZE="1m")
    init = work / cpt1["model"]["megatron_checkpoint"]
    rope = json.loads((init / "config.json").read_text()).get("rope_scaling", {}) if (init / "config.json").is_file() else {}
    report.check("converted checkpoint = the 1M CPT's model.megatron_checkpoint, YaRN factor 128, verified",
                 rope.get("rope_type") == "yarn" and float(rope.get("factor", 0)) == 128.0 and "-> OK" in log, str(rope))

    print("[3] SFT data (mu-prepare-sft on AceMath-Instruct general_sft_stage2's layout)", flush=True)
    sft_data = work / sft1["data"]["paths"][0]
    out = subprocess.run(["mu-prepare-sft", str(assets.ACEMATH_FILE), str(sft1["data"]["paths"][0])], cwd=work,
                         env=dict(slurm.env, PYTHONPATH=str(REPO)), text=True, capture_output=True)
    report.check("mu-prepare-sft writes the SFT recipes' data.paths", out.returncode == 0 and sft_data.is_file(),
                 out.stderr)

    print("[4] CPT 1M (train.sbatch, 2 tasks, CPU/gloo)", flush=True)
    ok, log = run_job(slurm, report, "train.sbatch RECIPE=llama31_8b_1m", "train.sbatch",
                      options=("--ntasks-per-node=2",), RECIPE=str(recipes["llama31_8b_1m"]))
    save = work / cpt1["train"]["save"]
    reference = metrics(work / assets.REFERENCE_LOG)
    report.check(f"CPT saved {cpt1['train']['save']}/{assets.CPT_STEPS:07d}-step checkpoint",
                 latest(save) == f"iter_{assets.CPT_STEPS:07d}", latest(save))
    report.check("CPT logged every step", sorted(reference) == list(range(1, assets.CPT_STEPS + 1)), str(sorted(reference))[:80])

    # The requeue test needs only this run as its reference: it runs beside the rest of the chain
    # (its wait for Slurm's time-limit check costs no wall time there).
    background = Report(buffered=True)
    requeue_thread = threading.Thread(target=requeue_safely, args=(slurm, background, work, recipes, reference))
    requeue_thread.start()

    print("[5] SFT 1M (train.sbatch)", flush=True)
    ok, log = run_job(slurm, report, "train.sbatch RECIPE=llama31_8b_1m_sft", "train.sbatch",
                      options=("--ntasks-per-node=2",), RECIPE=str(recipes["llama31_8b_1m_sft"]))
    sft_save = work / sft1["train"]["save"]
    report.check(f"SFT started from {sft1['model']['megatron_checkpoint']} and saved {sft1['train']['save']}",
                 latest(sft_save) == f"iter_{assets.SFT_STEPS:07d}" and cpt1["train"]["save"] in log, latest(sft_save))

    print("[6] export (SIZE=1m, --dtype bf16 --verify on an fp32 checkpoint)", flush=True)
    ok, log = run_job(slurm, report, "export_hf.sbatch", "export_hf.sbatch", SIZE="1m")
    exported = work / "export" / "UltraLong-8B-1M"
    config = json.loads((exported / "config.json").read_text()) if (exported / "config.json").is_file() else {}
    report.check("export/UltraLong-8B-1M: bf16, YaRN factor 128, verified in bf16",
                 config.get("torch_dtype") == "bfloat16" and float(config.get("rope_scaling", {}).get("factor", 0)) == 128
                 and "bfloat16): max |logit diff|" in log and "-> OK" in log, str(config.get("rope_scaling")))

    print("[7] NIAH (SIZE=1m, TP1 x CP2 = 2 processes)", flush=True)
    ok, log = run_job(slurm, report, "eval_niah_1m.sbatch", "eval_niah_1m.sbatch", "--device", "cpu", "--dtype",
                      "float32", "--haystack", "noise", options=("--cpus-per-task=2",), SIZE="1m", TP="1", CP="2",
                      LENGTHS="256 512")
    results = list((work / "results" / "niah_1m").glob("*.json"))
    report.check("results/niah_1m written from checkpoints/ultralong_1m_sft", bool(results), log[-400:])

    print("[8] 4M in the same $WORK: convert, CPT, SFT with the README's variables", flush=True)
    sft1_before = latest(sft_save)
    run_job(slurm, report, "convert_hf_to_mcore.sbatch SIZE=4m", "convert_hf_to_mcore.sbatch", "--dtype", "fp32",
            SIZE="4m")
    run_job(slurm, report, "train.sbatch RECIPE=llama31_8b_4m", "train.sbatch", options=("--ntasks-per-node=2",),
            RECIPE=str(recipes["llama31_8b_4m"]))
    ok, log = run_job(slurm, report, "train.sbatch RECIPE=llama31_8b_4m_sft", "train.sbatch",
                      options=("--ntasks-per-node=2",), RECIPE=str(recipes["llama31_8b_4m_sft"]))
    sft4 = real["llama31_8b_4m_sft"]
    report.check(f"4M SFT wrote its own {sft4['train']['save']} from {sft4['model']['megatron_checkpoint']}, "
                 "the 1M SFT untouched",
                 latest(work / sft4["train"]["save"]) == f"iter_{assets.SFT_STEPS:07d}"
                 and "factor 512" in log and latest(sft_save) == sft1_before, log[-400:])

    requeue_thread.join()
    print("[9] (beside 5-8) time-limit signal -> save -> requeue -> exact resume", flush=True)
    for line in background.lines:
        print(line, flush=True)
    report.passed += background.passed
    report.failed += background.failed


def requeue_safely(*args) -> None:
    try:
        requeue(*args)
    except Exception as e:
        args[1].check("requeue test", False, f"{type(e).__name__}: {e}")


def requeue(slurm: Slurm, report: Report, work: Path, recipes: dict, reference: dict[int, float]) -> None:
    t0 = time.time()
    log_file = work / assets.REQUEUE_LOG
    job_id = slurm.sbatch("train.sbatch", f"train.save={assets.REQUEUE_SAVE}", f"train.load={assets.REQUEUE_SAVE}",
                          f"train.log_file={assets.REQUEUE_LOG}",
                          options=("--ntasks-per-node=2", "--time=10", "--signal=B:USR1@50"),
                          RECIPE=str(recipes["llama31_8b_1m"]))
    # Lower the time limit to 1 minute once the trainer logs steps: Slurm then sends B:USR1 at its next
    # time-limit check (they run every ~30 s), with >= 10 s left to save.
    deadline = time.time() + 120
    while time.time() < deadline and not metrics(log_file) and slurm.job(job_id).get("JobState") in ("PENDING", "RUNNING"):
        time.sleep(0.2)
    if not report.check("the job runs and logs steps before its limit is lowered",
                        slurm.job(job_id).get("JobState") == "RUNNING" and bool(metrics(log_file))):
        return
    slurm.scontrol("update", f"JobId={job_id}", "TimeLimit=1")
    # Requeued: Slurm holds it (BeginTime, ~2 min); after >= 2 s (an immediate release fails with
    # "Job credential revoked") give it a long limit and let it start now.
    deadline = time.time() + 120
    info = slurm.job(job_id)
    while time.time() < deadline and not (info.get("JobState") == "PENDING" and info.get("Restarts") == "1"):
        time.sleep(0.3)
        info = slurm.job(job_id)
    first = metrics(log_file)
    saved = latest(work / assets.REQUEUE_SAVE)
    report.check(f"job {job_id} requeued itself after the time-limit signal ({time.time() - t0:.0f} s)",
                 info.get("JobState") == "PENDING" and info.get("Restarts") == "1", str(info.get("JobState")))
    report.check(f"the trainer saved on the signal before finishing ({saved}, {assets.CPT_STEPS} steps planned)",
                 bool(saved) and int(saved.split("_")[-1]) < assets.CPT_STEPS and max(first, default=0) <= int(saved.split("_")[-1]),
                 f"latest={saved!r}, logged up to {max(first, default=0)}")
    time.sleep(2.5)
    slurm.scontrol("update", f"JobId={job_id}", "TimeLimit=10", "StartTime=now")
    info = slurm.wait(job_id)
    log = slurm.log(info)
    report.check(f"the requeued job resumed and COMPLETED ({time.time() - t0:.0f} s)",
                 info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0"
                 and "requeueing job" in log, f"{info.get('JobState')} {info.get('ExitCode')}")
    losses = metrics(log_file)
    same = losses == reference and len(losses) == assets.CPT_STEPS
    diff = [s for s in reference if losses.get(s) != reference[s]][:5]
    report.check("losses of the interrupted run equal the uninterrupted run's at every step (exact resume)", same,
                 f"first differing steps {diff}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    args = parser.parse_args(argv)
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mu-slurm-"))
    work = scratch / "work"
    (work / "logs").mkdir(parents=True)
    report = Report()
    slurm = Slurm(scratch, work)
    try:
        up = slurm.up()
        if report.check("one-node Slurm started (munged, slurmctld, slurmd)", up.returncode == 0, up.stdout + up.stderr):
            chain(slurm, report, work)
    except Exception as e:  # a broken step must not leave the daemons running
        report.check("driver", False, f"{type(e).__name__}: {e}")
    finally:
        slurm.down()
        leftover = subprocess.run(["pgrep", "-f", str(scratch)], capture_output=True, text=True).stdout.split()
        report.check("the daemons it started are stopped", not leftover, " ".join(leftover))
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"({time.time() - t0:.0f} s)")
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
