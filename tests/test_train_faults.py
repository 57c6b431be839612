"""A run that never loses work and never trains on wrong numbers, on CPU/gloo:
NaN from a huge LR stops it; out-of-vocab data is refused; a flipped byte in a .distcp falls back to
the previous checkpoint; a misspelled train.load leaves the old run byte-for-byte intact; SIGTERM
saves the current step and the resume is exact; retention; a TP change is refused up front."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from test_train_loop import EOD, _make_dataset, _overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "arith")
    _make_dataset(prefix)
    return prefix


def _trainer(overrides, log_to=None):
    from megatron_ultralong.logs import setup_logging
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    if log_to:
        setup_logging(stream=open(log_to, "a"))
    return Trainer(load_train_config(None, overrides))


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def _strict_lines(path):
    """Metrics JSONL, refusing bare NaN/Infinity (what a strict reader such as jq does)."""
    return [json.loads(x, parse_constant=lambda c: pytest.fail(f"bare {c} in {path}")) for x in open(path)]


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


# --- 1. NaN / Inf ---

def _nan_body(rank, world_size, overrides, out):
    from megatron_ultralong.training.guards import NonFiniteError

    trainer = _trainer(overrides)
    try:
        trainer.train()
        result = {"error": None}
    except NonFiniteError as e:
        result = {"error": str(e)}
    if rank == 0:
        _dump(out, result)


def test_huge_lr_stops_at_the_first_bad_steps_and_never_saves_them(dataset, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "m.jsonl"
    extra = {"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.decay_style": "constant", "train.save": ckpt,
             "train.save_interval": 1, "train.log_file": log, "train.log_interval": 1, "train.max_bad_steps": 2}
    run_distributed(_nan_body, 2, args=(_overrides(dataset, **extra), str(tmp_path / "r.json")))
    error = json.loads((tmp_path / "r.json").read_text())["error"]
    # Weights of ~1e30 after step 1: the gradient of step 2 is NaN (before the fix: skipped silently,
    # exit 0, and the broken run saved as `latest`).
    assert error is not None and "step 3: non-finite gradient norm" in error and "2 consecutive" in error
    lines = _strict_lines(log)
    assert [m["step"] for m in lines] == [1, 2]  # step 3 stopped the run
    assert lines[0]["nonfinite"] is None and lines[0]["applied"]
    assert lines[1]["nonfinite"] == "gradient norm" and lines[1]["grad_norm"] is None and not lines[1]["applied"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"  # the bad steps were never saved
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]


# --- 2. token ids outside the vocabulary; output paths, checked before step 1 ---

def _startup_body(rank, world_size, good, bad, tmp):
    from megatron_ultralong.training.config import load_train_config

    base = ("data.seq_length=64", "train.steps=2", "train.global_batch_size=2")
    cases = [
        ((f"data.paths=[{bad}]",), rf"{bad}.bin holds token id 1000 \(first at token \d+\), outside the model's vocabulary of 1000"),
        # A log_file directory is created at start; one that cannot be (a regular file in the way) fails there.
        ((f"data.paths=[{good}]", f"train.log_file={good}.bin/sub/m.jsonl"), r"train.log_file=.*cannot append"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            _trainer(base + extra)


def test_out_of_vocab_ids_and_unwritable_outputs_are_refused_at_start(dataset, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    bad = str(tmp_path / "bad")
    builder = IndexedDatasetBuilder(bad + ".bin", dtype=np.uint16)
    for k in range(40):
        doc = [1 + (k + i) % 60 for i in range(50)] + ([1000] if k == 7 else []) + [EOD]  # 1000 = tiny's vocab
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(bad + ".idx")
    run_distributed(_startup_body, 2, args=(dataset, bad, str(tmp_path)))


# --- 3-5. corrupt checkpoint -> fallback; re-run does not re-save; misspelled load ---

def _run_body(rank, world_size, overrides, out, log_to):
    trainer = _trainer(overrides, log_to)
    history = trainer.train()
    if rank == 0:
        _dump(out, {"steps": [h["step"] for h in history], "loss": [h["loss"] for h in history],
                    "stop": trainer.stop_reason})


def _run(world, overrides, tmp_path, name):
    out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    run_distributed(_run_body, world, args=(overrides, str(out), str(log)))
    return json.loads(out.read_text()), log.read_text()


def test_flipped_byte_falls_back_and_misspelled_load_touches_nothing(dataset, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "m.jsonl"
    kw = {"train.save": ckpt, "train.save_interval": 1, "train.log_file": log, "train.log_interval": 1,
          "optim.warmup_steps": 1}
    first, _ = _run(1, _overrides(dataset, **{**kw, "train.steps": 2}), tmp_path, "a")
    assert first["steps"] == [1, 2]

    distcp = sorted((ckpt / "iter_0000002" / "model").glob("*.distcp"))[0]
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2] ^= 0xFF
    distcp.write_bytes(bytes(data))
    resumed, text = _run(1, _overrides(dataset, **{**kw, "train.steps": 3}), tmp_path, "b")
    assert f"{distcp.name} is corrupt" in text and "trying an older checkpoint" in text
    assert f"resumed from {ckpt / 'iter_0000001'} at step 1" in text
    assert resumed["steps"] == [2, 3] and resumed["loss"][0] == first["loss"][1]  # step 2 again, exactly
    assert (ckpt / ".iter_0000002.corrupt").is_dir() and (ckpt / "latest").read_text().strip() == "iter_0000003"
    assert [m["step"] for m in _strict_lines(log)] == [1, 2, 3]  # the re-run step 2 is logged once

    # Re-running the finished job trains nothing and re-saves nothing in place.
    stat = (ckpt / "iter_0000003" / "trainer_state.json").stat()
    again, _ = _run(1, _overrides(dataset, **{**kw, "train.steps": 3}), tmp_path, "c")
    assert again["steps"] == []
    assert (ckpt / "iter_0000003" / "trainer_state.json").stat().st_ino == stat.st_ino

    # A misspelled train.load: said loudly, refused, and the old run's files are byte-identical.
    before = _hashes(ckpt)
    with pytest.raises(AssertionError, match="holds checkpoints of another run"):
        _run(1, _overrides(dataset, **{**kw, "train.load": tmp_path / "cktp", "train.steps": 3}), tmp_path, "d")
    assert f"no checkpoint found in {tmp_path / 'cktp'}, starting from scratch" in (tmp_path / "d.log").read_text()
    assert _hashes(ckpt) == before


# --- 6. SIGTERM: save the current step, exit 75, resume exactly ---

def _cli(args, log):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "examples"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    return subprocess.Popen([sys.executable, "-m", "megatron_ultralong.training.cli", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def test_sigterm_saves_the_current_step_and_resumes_exactly(dataset, tmp_path):
    from megatron_ultralong.training.guards import EXIT_SAVED_AND_STOPPED

    steps = {"train.steps": 8, "train.log_interval": 1}
    straight_log = tmp_path / "straight.jsonl"
    straight = _cli(_overrides(dataset, **steps, **{"train.log_file": straight_log}), tmp_path / "s.out")
    assert straight.wait(600) == 0
    ckpt, log = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = _overrides(dataset, **steps, **{"train.log_file": log, "train.save": ckpt, "train.save_interval": 100})
    proc = _cli(args, tmp_path / "1.out")
    deadline = time.time() + 600
    while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # mid-run: during step 3 (or later)
    assert proc.wait(600) == EXIT_SAVED_AND_STOPPED, (tmp_path / "1.out").read_text()
    at = len(log.read_text().splitlines())
    assert 2 <= at < 8
    assert (ckpt / "latest").read_text().strip() == f"iter_{at:07d}"  # the step it was in, not the last interval
    assert "signal SIGTERM: stopping after step" in (tmp_path / "1.out").read_text()

    rest = _cli(args, tmp_path / "2.out")  # the requeued job: same command, train.load defaults to train.save
    assert rest.wait(600) == 0, (tmp_path / "2.out").read_text()
    assert f"resumed from {ckpt / f'iter_{at:07d}'} at step {at}" in (tmp_path / "2.out").read_text()
    got, want = _strict_lines(log), _strict_lines(straight_log)
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [(m["loss"], m["grad_norm"]) for m in got] == [(m["loss"], m["grad_norm"]) for m in want]


def _signal_one_rank_body(rank, world_size, overrides, out, at_step):
    trainer = _trainer(overrides)
    produce = trainer._micro_batches

    def micro_batches():
        if rank == 1 and trainer.step == at_step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank is told, in the middle of a step
        return produce()

    trainer._micro_batches = micro_batches
    history = trainer.train()
    _dump(f"{out}.{rank}", {"steps": [h["step"] for h in history], "stop": trainer.stop_reason})


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_and_retention(dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    extra = {"train.save": ckpt, "train.save_interval": 1, "train.keep_last": 1, "train.keep_every": 2}
    run_distributed(_signal_one_rank_body, 2, args=(_overrides(dataset, **extra), str(tmp_path / "r"), 5))
    r0, r1 = (json.loads((tmp_path / f"r.{k}").read_text()) for k in (0, 1))
    assert r0["steps"] == r1["steps"] == [1, 2, 3, 4, 5]
    assert r1["stop"] == "signal SIGUSR1" and r0["stop"] == "signal received by another rank"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000002", "iter_0000004", "iter_0000005"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"


# --- 8. a changed TP on resume is refused before anything loads ---

def test_changed_tp_on_resume_is_refused_naming_both_layouts(dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    kw = {"train.save": ckpt, "train.steps": 1, "train.global_batch_size": 2, "optim.warmup_steps": 0}
    _run(2, _overrides(dataset, **kw, **{"parallel.tensor_parallel": 2}), tmp_path, "tp2")
    with pytest.raises(AssertionError, match=r"parallel.tensor_parallel: saved 2, requested 1"):
        _run(2, _overrides(dataset, **{**kw, "train.steps": 2}), tmp_path, "tp1")
