"""One read path for every reader of a Megatron checkpoint: conversion (`mu-convert mcore-to-hf`),
evaluation's Megatron backend, start-from (`model.megatron_checkpoint=`) and resume.

A hostile writer of a shared checkpoint directory (who can rewrite the manifest too) plants:
a `.metadata` pickle calling `os.system` plainly and through a dotted name (protocol 4
STACK_GLOBAL `torch.distributed.checkpoint.metadata` + `os.system`), a `.metadata` whose storage
entry reads `../x`, a `latest` holding `../../x`, symbolic links. A flipped byte (storage
corruption) must be refused by the manifest before anything is written. The command the pickles
would run creates a marker file: it must never exist.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import pytest
import torch

from convert_fixtures import make_hf_model
from dist_utils import run_distributed
from megatron_ultralong.checkpoint import manifest as mf
from megatron_ultralong.convert.cli import main


def _short_str(s: str) -> bytes:
    data = s.encode()
    return b"\x8c" + struct.pack("<B", len(data)) + data  # SHORT_BINUNICODE


def evil_pickle(kind: str, marker) -> bytes:
    """A pickle that runs `touch marker` when loaded: `plain` names posix.system itself; `dotted`
    asks an allowed module for the attribute path `os.system` (protocol 4 resolves dots)."""
    cmd = f"touch {marker}"
    if kind == "plain":
        class _Boom:
            def __reduce__(self):
                return (os.system, (cmd,))
        return pickle.dumps(_Boom(), protocol=2)
    return (b"\x80\x04" + _short_str("torch.distributed.checkpoint.metadata") + _short_str("os.system")
            + b"\x93" + _short_str(cmd) + b"\x85" + b"R" + b".")


def test_the_dotted_pickle_really_runs_code_when_unpickled_plainly(tmp_path):
    """The fixture is what it claims: plain pickle runs it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    pickle.loads(evil_pickle("dotted", marker))
    assert marker.exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny model as `hf-to-mcore` writes it (model dir with its manifest), laid out once more as a
    training save dir: <save>/iter_0000003/model + trainer_state.json + manifest.json + latest."""
    root = tmp_path_factory.mktemp("ckpt")
    make_hf_model(kv=2, tied=False, rope_scaling=None).save_pretrained(root / "hf")
    assert main(["hf-to-mcore", str(root / "hf"), str(root / "mc"), "--no-progress"]) == 0
    return root


def _copy(converted, tmp_path):
    """A fresh copy: (model dir, save dir) both with valid manifests."""
    model = tmp_path / "mc"
    shutil.copytree(converted / "mc", model)
    save = tmp_path / "save"
    it = save / "iter_0000003"
    shutil.copytree(converted / "mc", it / "model")
    (it / "model" / mf.MANIFEST).unlink()  # a training save keeps one manifest for the iteration
    (it / "trainer_state.json").write_text(json.dumps({
        "step": 3, "consumed_samples": 6, "scheduler": {}, "world_size": 1,
        "config": {"parallel": {"tensor_parallel": 1, "pipeline_parallel": 1}}}))
    mf.write_manifest(it)
    (save / "latest").write_text("iter_0000003\n")
    return model, save


def _plant(model_dir, data: bytes, manifest_root=None):
    """Replace `.metadata` and, as an attacker with write access would, rewrite the manifest."""
    (model_dir / ".metadata").write_bytes(data)
    mf.write_manifest(manifest_root or model_dir)


def _readers_body(rank, world_size, model_dir, save_dir, match, data_paths):
    """Evaluation, start-from and resume on the same planted checkpoint: each refuses with `match`."""
    from megatron_ultralong.checkpoint import train_state as ts
    from megatron_ultralong.eval.megatron_backend import MegatronBackend
    from megatron_ultralong.model import build_model
    from megatron_ultralong.checkpoint.info import read_checkpoint_info
    from megatron_ultralong.parallel.runtime import ParallelConfig, init_runtime, shutdown_runtime
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    rt = init_runtime(ParallelConfig(), device="cpu")
    with pytest.raises(ValueError, match=match):  # mu-eval-* --model <megatron checkpoint>
        MegatronBackend.from_checkpoint(model_dir, rt)
    if save_dir is not None:  # resume: the trainer's train_state.resume
        model = build_model(read_checkpoint_info(model_dir).model_config, rt)
        with pytest.raises(ValueError, match=match):
            ts.resume(save_dir, model, None, None)
    shutdown_runtime()
    with pytest.raises(ValueError, match=match):  # model.megatron_checkpoint=
        Trainer(load_train_config(None, (f"data.paths=[{data_paths}]", f"model.megatron_checkpoint={model_dir}",
                                         "train.device=cpu", "data.seq_length=16")))


@pytest.mark.slow  # ~20 s: the export CLI twice and three readers in a gloo process
@pytest.mark.parametrize("kind", ["plain", "dotted"])
def test_metadata_that_would_run_code_is_refused_by_every_reader(converted, tmp_path, kind, capsys):
    from megatron_ultralong.checkpoint.safe_metadata import read_dcp_metadata

    marker = tmp_path / "pwned"
    model, save = _copy(converted, tmp_path)
    _plant(model, evil_pickle(kind, marker))
    _plant(save / "iter_0000003" / "model", evil_pickle(kind, marker), save / "iter_0000003")
    refused = r"\.metadata: refuses to unpickle (posix\.system|torch\.distributed\.checkpoint\.metadata\.os\.system)"

    with pytest.raises(mf.CheckpointCorruptError, match=refused):
        read_dcp_metadata(model)
    assert main(["mcore-to-hf", str(model), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "refuses to unpickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert main(["mcore-to-hf", str(save), str(tmp_path / "out"), "--no-progress"]) == 2  # via `latest`
    run_distributed(_readers_body, 1, args=(str(model), str(save), refused, str(tmp_path / "none")))
    assert not marker.exists()


@pytest.mark.slow  # ~20 s: the export CLI four times and the readers in a gloo process
def test_flipped_byte_is_refused_before_anything_is_written(converted, tmp_path, capsys):
    model, save = _copy(converted, tmp_path)
    for root in (model, save / "iter_0000003" / "model"):
        distcp = sorted(root.glob("*.distcp"))[0]
        data = bytearray(distcp.read_bytes())
        data[len(data) // 2] ^= 0x01
        distcp.write_bytes(bytes(data))
    name = sorted(model.glob("*.distcp"))[0].name
    for src in (model, save, save / "iter_0000003"):
        assert main(["mcore-to-hf", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{name} is corrupt: CRC-32" in err and "--no-verify-manifest" in err, err
        assert not (tmp_path / "out").exists()
    run_distributed(_readers_body, 1, args=(str(model), None, f"{name} is corrupt", str(tmp_path / "none")))
    # Asked for explicitly: the export proceeds (the weights are what they are).
    assert main(["mcore-to-hf", str(model), str(tmp_path / "out"), "--no-progress", "--no-verify-manifest"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.slow  # ~20 s on a shared 2-core box (the export CLI several times, readers in a gloo process)
def test_paths_that_leave_the_checkpoint_are_refused(converted, tmp_path, capsys):
    from megatron_ultralong.checkpoint.safe_metadata import read_dcp_metadata

    model, save = _copy(converted, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(converted / "mc", outside)
    cases = []
    # `latest` naming a path out of the save directory (resume already refused it; export followed it).
    (save / "latest").write_text("../../elsewhere\n")
    cases.append((save, "not an iter_XXXXXXX directory"))
    s2 = tmp_path / "save2"
    s2.mkdir()
    (s2 / "iter_0000009").symlink_to(outside.parent / "save" / "iter_0000003")
    (s2 / "latest").write_text("iter_0000009\n")
    cases.append((s2, "leads outside"))
    it = tmp_path / "iter_link"  # an iter dir whose model/ is a link
    it.mkdir()
    (it / "model").symlink_to(outside)
    cases.append((it, "model is a symbolic link"))
    m2 = tmp_path / "m2"  # a file inside the model dir that is a link (e.g. to copy it into an export)
    shutil.copytree(converted / "mc", m2)
    (m2 / "hf_files").mkdir(exist_ok=True)
    (m2 / "hf_files" / "tokenizer.json").symlink_to(tmp_path / "secret")
    cases.append((m2, "tokenizer.json is a symbolic link"))
    for src, why in cases:
        assert main(["mcore-to-hf", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
        assert why in capsys.readouterr().err, why
        assert not (tmp_path / "out").exists()
    # The evaluators and start-from resolve the same way (resume's `latest`: test_checkpoint_safety.py).
    run_distributed(_readers_body, 1, args=(str(save), None, "not an iter_XXXXXXX directory", str(tmp_path / "none")))

    # A vetted-looking `.metadata` whose storage entry reads a file outside the directory.
    md = read_dcp_metadata(model)
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../elsewhere/" + info.relative_path
    _plant(model, pickle.dumps(md))
    with pytest.raises(mf.CheckpointCorruptError, match="a path out of the checkpoint"):
        read_dcp_metadata(model)
    assert main(["mcore-to-hf", str(model), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "a path out of the checkpoint" in capsys.readouterr().err

    # A file added after the save (listed nowhere) is refused by the manifest check.
    m3 = tmp_path / "m3"
    shutil.copytree(converted / "mc", m3)
    (m3 / "__9_0.distcp").write_bytes(b"x")
    assert main(["mcore-to-hf", str(m3), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "__9_0.distcp is not listed in" in capsys.readouterr().err


def test_hf_index_naming_files_outside_is_refused(tmp_path, capsys):
    hf = tmp_path / "hf"
    make_hf_model(kv=2, tied=False, rope_scaling=None).save_pretrained(hf, max_shard_size="60KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "x.safetensors").write_bytes((hf / shard).read_bytes())
    for bad in ("../x.safetensors", str(tmp_path / "x.safetensors")):
        body = dict(index, weight_map={k: (bad if v == shard else v) for k, v in index["weight_map"].items()})
        (hf / "model.safetensors.index.json").write_text(json.dumps(body))
        assert main(["hf-to-mcore", str(hf), str(tmp_path / "mc"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"= {bad!r} is not a file of" in err, err
        assert not (tmp_path / "mc").exists()


def test_retention_and_resume_ignore_symlinked_iterations(tmp_path, caplog):
    from megatron_ultralong.checkpoint import train_state as ts

    save, outside = tmp_path / "save", tmp_path / "outside"
    for root, steps in ((save, (1, 2, 3)), (outside, (7,))):
        for s in steps:
            d = root / f"iter_{s:07d}"
            d.mkdir(parents=True)
            (d / ts.STATE).write_text("{}")
    (save / "iter_0000009").symlink_to(outside / "iter_0000007")  # newest by name, and a link
    with caplog.at_level("WARNING"):
        assert [p.name for p in ts.resume_candidates(save)] == ["iter_0000003", "iter_0000002", "iter_0000001"]
    assert "iter_0000009 is a symbolic link: ignored" in caplog.text
    deleted = ts.apply_retention(str(save), keep_last=1, keep_every=None, protect=save / "iter_0000003")
    assert sorted(p.name for p in deleted) == ["iter_0000001", "iter_0000002"]
    assert (save / "iter_0000009").is_symlink() and (outside / "iter_0000007" / ts.STATE).is_file()
    assert not list(save.glob(".*deleting"))


def test_checkpoint_info_is_read_in_one_place_with_its_format_version(converted, tmp_path):
    """The dry run's reader (checkpoint/paths.py) and the loader's give the same answer and the same
    refusal: both go through checkpoint/info.py."""
    from megatron_ultralong.checkpoint.info import INFO_FILE, read_checkpoint_info
    from megatron_ultralong.checkpoint.paths import checkpoint_model_config

    model, _ = _copy(converted, tmp_path)
    assert checkpoint_model_config(model) == read_checkpoint_info(model).model_config
    body = json.loads((model / INFO_FILE).read_text())
    (model / INFO_FILE).write_text(json.dumps({**body, "format_version": 2}))
    for read in (checkpoint_model_config, read_checkpoint_info):
        with pytest.raises(ValueError, match=rf"{INFO_FILE}: format_version=2, expected 1"):
            read(model)
