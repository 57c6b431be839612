"""Checkpoint-side safety without a training run: manifest, pointer fallback, retention, save-dir
ownership, RNG files that cannot run code, and the start-up checks of training/startup_checks.py."""
import json
import os
import pickle
import random
import zlib

import numpy as np
import pytest
import torch

from megatron_ultralong.checkpoint import manifest as mf
from megatron_ultralong.checkpoint import train_state as ts


def _fake_iter(root, step, payload=b"x" * 100):
    """An iter_ directory as the save writes it: files, trainer_state.json, then the manifest."""
    d = root / f"iter_{step:07d}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "__0_0.distcp").write_bytes(payload * (step + 1))
    (d / "model" / "common.pt").write_bytes(b"common" * 10)
    (d / ts.STATE).write_text(json.dumps({"step": step, "consumed_samples": 2 * step, "scheduler": {},
                                          "world_size": 1, "config": {"parallel": {"tensor_parallel": 1}}}))
    mf.write_manifest(d)
    return d


def test_manifest_names_flipped_truncated_and_missing_files(tmp_path):
    d = _fake_iter(tmp_path, 3)
    assert mf.verify_manifest(d) is None
    body = json.loads((d / mf.MANIFEST).read_text())
    distcp = d / "model" / "__0_0.distcp"
    assert body["files"]["model/__0_0.distcp"]["crc32"] == zlib.crc32(distcp.read_bytes())  # independent CRC

    data = bytearray(distcp.read_bytes())
    data[57] ^= 0x01  # one flipped bit
    distcp.write_bytes(bytes(data))
    assert "model/__0_0.distcp is corrupt" in mf.verify_manifest(d)

    distcp.write_bytes(bytes(data[:100]))
    assert "__0_0.distcp is truncated" in mf.verify_manifest(d)

    (d / "model" / "common.pt").unlink()
    msg = mf.verify_manifest(d)
    assert "__0_0.distcp is truncated" in msg and "(and 1 more file(s))" in msg
    data[57] ^= 0x01
    distcp.write_bytes(bytes(data))  # the original bytes again
    assert "model/common.pt is missing" in mf.verify_manifest(d)

    (d / mf.MANIFEST).write_text("{not json")
    with pytest.raises(mf.CheckpointCorruptError, match="manifest.json: unreadable"):
        mf.verify_manifest(d)


def test_latest_naming_a_missing_or_foreign_directory_falls_back(tmp_path, caplog):
    for s in (1, 2, 3):
        _fake_iter(tmp_path, s)
    (tmp_path / "iter_0000004").mkdir()  # incomplete: no trainer_state.json
    (tmp_path / ts.LATEST).write_text("iter_0000003\n")
    assert ts.resume_candidates(tmp_path)[0].name == "iter_0000003"

    for pointer, why in [("iter_0000009", "does not exist"), ("iter_0000004", "incomplete"),
                         ("../../etc", "not an iter_XXXXXXX"), ("/etc/passwd", "not an iter_XXXXXXX")]:
        (tmp_path / ts.LATEST).write_text(pointer + "\n")
        caplog.clear()
        with caplog.at_level("WARNING"):
            cands = ts.resume_candidates(tmp_path)
        assert [c.name for c in cands] == ["iter_0000003", "iter_0000002", "iter_0000001"]
        assert why in caplog.text and "falling back to the newest complete checkpoint" in caplog.text

    outside = tmp_path.parent / "elsewhere"
    outside.mkdir()
    (tmp_path / "iter_0000007").symlink_to(outside)
    (tmp_path / ts.LATEST).write_text("iter_0000007\n")
    assert ts._pointer_target(tmp_path)[0] is None

    (tmp_path / ts.STATE).write_text("")
    (tmp_path / "iter_0000003" / ts.STATE).write_text('{"step": 3,')
    with pytest.raises(mf.CheckpointCorruptError, match=r"iter_0000003/trainer_state.json: not valid JSON"):
        ts.read_train_state(tmp_path / "iter_0000003")


def test_retention_keeps_last_and_every_kth(tmp_path):
    for s in range(1, 8):
        _fake_iter(tmp_path, s)
    (tmp_path / ".iter_0000008.partial").mkdir()
    deleted = ts.apply_retention(str(tmp_path), keep_last=2, keep_every=3, protect=tmp_path / "iter_0000007")
    assert sorted(p.name for p in deleted) == ["iter_0000001", "iter_0000002", "iter_0000004", "iter_0000005"]
    assert [p.name for _, p in ts.iteration_dirs(tmp_path)] == ["iter_0000003", "iter_0000006", "iter_0000007"]
    assert not list(tmp_path.glob(".*.deleting"))
    assert ts.apply_retention(str(tmp_path), keep_last=None, keep_every=None, protect=tmp_path) == []


def test_save_dir_of_another_run_is_refused_then_moved_aside(tmp_path):
    run = tmp_path / "run"
    _fake_iter(run, 5)
    (run / ts.LATEST).write_text("iter_0000005\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    msg = ts.save_dir_conflict(str(run), None, overwrite=False)
    assert "holds checkpoints of another run (iter_0000005" in msg and "starts from scratch" in msg
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert ts.save_dir_conflict(str(run), run / "iter_0000005", overwrite=False) is None  # its own run
    assert "resumed from" in ts.save_dir_conflict(str(run), tmp_path / "other" / "iter_0000001", overwrite=False)

    assert ts.save_dir_conflict(str(run), None, overwrite=True) is None
    assert ts.iteration_dirs(run) == [] and not (run / ts.LATEST).exists()
    aside = list(run.glob(".overwritten-*"))
    assert len(aside) == 1 and (aside[0] / "iter_0000005" / ts.STATE).is_file()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/i13_pwned_marker",))


def test_rng_state_roundtrips_through_weights_only_and_pickles_are_refused(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = ts._rng_state(use_cuda=False)
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    ts._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2:] == got[2:]

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"torch": _Boom()}, f)
    if os.path.exists("/tmp/i13_pwned_marker"):
        os.remove("/tmp/i13_pwned_marker")
    with pytest.raises(mf.CheckpointCorruptError, match="evil.pt could not be loaded"):
        ts._named(str(tmp_path / "evil.pt"), lambda: torch.load(tmp_path / "evil.pt", weights_only=True))
    assert not os.path.exists("/tmp/i13_pwned_marker")


def test_layout_change_is_refused_naming_both(tmp_path):
    state = {"config": {"parallel": {"tensor_parallel": 2, "pipeline_parallel": 1, "context_parallel": 2}}}
    ts.check_layout(tmp_path, state, {"tensor_parallel": 2, "pipeline_parallel": 1, "context_parallel": 1})
    with pytest.raises(ValueError, match=r"parallel.tensor_parallel: saved 2, requested 1"):
        ts.check_layout(tmp_path, state, {"tensor_parallel": 1, "pipeline_parallel": 1})


def test_metrics_lines_are_strict_json_and_resume_drops_rerun_steps(tmp_path):
    from megatron_ultralong.training.guards import metrics_line, trim_metrics_log

    line = metrics_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == \
        {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3}
    log = tmp_path / "m.jsonl"
    log.write_text("".join(metrics_line({"step": s, "loss": 1.0}) for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_metrics_log(str(log), 3) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]


def test_config_refuses_warmup_not_shorter_than_the_run():
    from megatron_ultralong.training.config import load_train_config

    with pytest.raises(ValueError, match=r"optim.warmup_steps=10 must be < train.steps=10"):
        load_train_config(None, ("data.paths=[x]", "optim.warmup_steps=10", "train.steps=10"))
    with pytest.raises(ValueError, match=r"train.exit_signals: 'SIGKILL'"):
        load_train_config(None, ("data.paths=[x]", "train.exit_signals=[SIGKILL]"))
    cfg = load_train_config(None, ("data.paths=[x]", "train.save=/ckpt/run"))
    assert cfg.train.load_dir == "/ckpt/run" and cfg.train.max_bad_steps == 1 and not cfg.train.overwrite


def _indexed(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_start_up_data_checks(tmp_path):
    from megatron_ultralong.training import startup_checks as sc

    prefix = str(tmp_path / "d")
    _indexed(prefix, [[1, 2, 3, 999], [4, 5, 1000, 7, 999]])
    msg = sc.token_id_problem([prefix], vocab_size=1000)
    assert msg.startswith(f"{prefix}.bin holds token id 1000 (first at token 6)")
    assert sc.token_id_problem([prefix], vocab_size=1001) is None

    warnings = sc.epoch_warnings([prefix], None, seq_length=2, num_samples=8, steps=4, global_batch=2)
    assert len(warnings) == 1 and "4 samples of 2 per epoch" in warnings[0] and "starts around step 3" in warnings[0]
    assert sc.epoch_warnings([prefix], None, seq_length=2, num_samples=4, steps=2, global_batch=2) == []

    cache = str(tmp_path / "cache")
    assert sc.stale_cache_problem([prefix], cache) is None  # records the fingerprint
    assert sc.stale_cache_problem([prefix], cache) is None
    assert sc.token_id_problem([prefix], vocab_size=1001, cache_dir=cache) is None
    record = json.loads((tmp_path / "cache" / sc.FINGERPRINT_FILE).read_text())
    assert record[os.path.abspath(prefix)]["max_token"] == [1000, 6]  # a requeued job does not rescan
    assert sc.token_id_problem([prefix], vocab_size=1000, cache_dir=cache).startswith(f"{prefix}.bin holds token id 1000")
    _indexed(prefix, [[1, 2, 3, 999]] * 3)  # rebuilt in place
    assert "changed since megatron's sample index" in sc.stale_cache_problem([prefix], cache)

    class _Sft:
        _ids = np.array([5, 1200, 7], dtype=np.int32)
    assert "produced token id 1200, outside the model's vocabulary of 1000" in \
        sc.sft_token_id_problem(_Sft(), ["c.jsonl"], 0, 1000)
    assert sc.sft_token_id_problem(_Sft(), ["c.jsonl"], 0, 1201) is None
    assert "data.pad_token_id=1201" in sc.sft_token_id_problem(_Sft(), ["c.jsonl"], 1201, 1201)

    assert sc.output_problem(str(tmp_path / "new" / "dir" / "m.jsonl"), None, None) is None  # created at start
    assert (tmp_path / "new" / "dir").is_dir()
    assert sc.output_problem(str(tmp_path / "m.jsonl"), str(tmp_path / "save"), None) is None
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    assert "train.log_file=" in sc.output_problem(str(ro / "file" / "m.jsonl"), None, None)
    assert "train.save=" in sc.output_problem(None, str(ro / "file" / "sub"), None)


def test_guard_counts_consecutive_bad_steps_and_stop_conditions(caplog):
    import signal as sig

    from megatron_ultralong.training.guards import NonFiniteError, NonFiniteGuard, StopConditions

    guard = NonFiniteGuard(max_bad_steps=2, device=torch.device("cpu"))
    assert guard.loss_is_finite(1, 2.5) and guard.record(1, 2.5, 1.0, True) is None
    assert not guard.loss_is_finite(2, float("nan"))
    with caplog.at_level("WARNING"):
        assert guard.record(2, float("nan"), float("nan"), False) == "loss"
    assert "step 2: non-finite loss, update skipped (1 of train.max_bad_steps=2)" in caplog.text
    assert guard.record(3, 2.0, 1.0, True) is None  # a good step resets the count
    guard.record(4, 2.0, float("inf"), True)
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite gradient norm .* 2 consecutive"):
        guard.record(5, 2.0, float("nan"), True)
    with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
        NonFiniteGuard(1, torch.device("cpu")).record(1, float("inf"), float("nan"), False)

    before = sig.getsignal(sig.SIGUSR1)
    stops = StopConditions(["SIGUSR1"], None, torch.device("cpu"))
    assert stops.check() is None
    os.kill(os.getpid(), sig.SIGUSR1)  # handled: the process lives on
    assert stops.check() == "signal SIGUSR1"
    stops.restore()
    assert sig.getsignal(sig.SIGUSR1) is before
    assert StopConditions([], 1e-9, torch.device("cpu")).check() == "train.exit_duration_minutes=1e-09 reached"


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from megatron_ultralong.checkpoint.safe_metadata import check_dcp_metadata

    good = tmp_path / "good"
    dcp.save({"w": torch.randn(4, 3), "b": torch.zeros(2, dtype=torch.bfloat16)},
             storage_writer=dcp.FileSystemWriter(str(good)))
    check_dcp_metadata(good)  # what torch's writer emits passes

    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / ".metadata", "wb") as f:
        pickle.dump({"state_dict_metadata": _Boom()}, f)
    if os.path.exists("/tmp/i13_pwned_marker"):
        os.remove("/tmp/i13_pwned_marker")
    with pytest.raises(mf.CheckpointCorruptError, match=r"bad/.metadata: refuses to unpickle posix.system"):
        check_dcp_metadata(bad)
    assert not os.path.exists("/tmp/i13_pwned_marker")
    (bad / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(mf.CheckpointCorruptError, match="unreadable checkpoint metadata"):
        check_dcp_metadata(bad)
