"""What a long job logs: the start banner, the step line, the metric sinks, and no false warnings."""
from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
import pytest
import torch

from dist_utils import run_distributed

EOD = 999


def _make_dataset(prefix: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(60):
        doc = list(rng.integers(1, 60, size=int(rng.integers(5, 60)))) + [EOD]
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "toy")
    _make_dataset(prefix)
    return prefix


def _overrides(dataset, ckpt, log_file, steps):
    return (f"data.paths=[{dataset}]", "data.seq_length=64", f"train.steps={steps}", "train.global_batch_size=2",
            f"train.save={ckpt}", f"train.load={ckpt}", f"train.log_file={log_file}", "train.peak_tflops=1.0")


def _train_and_capture(rank, world_size, overrides, out_file):
    from megatron_ultralong.logs import setup_logging
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    stream = io.StringIO()
    setup_logging(stream=stream)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(load_train_config(None, overrides)).train()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"log": stream.getvalue(), "warnings": [str(w.message) for w in caught]}, f)


def test_banner_step_lines_jsonl_and_resume(dataset, tmp_path):
    ckpt, log_file = tmp_path / "ckpt", tmp_path / "new" / "dir" / "metrics.jsonl"  # the directory does not exist
    run_distributed(_train_and_capture, 2, args=(_overrides(dataset, ckpt, log_file, 3), str(tmp_path / "a.json")))
    first = json.loads((tmp_path / "a.json").read_text())
    log = first["log"]
    assert "layout: world 2 = TP1 x PP1 x CP1 x DP2 on cpu" in log
    assert f"data: pretrain {dataset}" in log and "rope: default" in log
    assert f"no checkpoint found in {ckpt}, starting from scratch" in log
    steps = [line for line in log.splitlines() if "[train] step " in line]
    assert [re.search(r"step (\d+)/3", s).group(1) for s in steps] == ["1", "2", "3"]
    for field in (r"[\d,]+ tok/s global, [\d,]+ tok/s/GPU", r"TFLOP/s/GPU MFU", r"GiB alloc/reserved/peak \(\d+% of",
                  r"ETA (\d+d)?\d\d:\d\d:\d\d", r"[\d.]+ s/step"):
        assert all(re.search(field, s) for s in steps), field
    assert re.search(r"\] \[train\] step", steps[0]) and re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]", steps[0])
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    r = rows[-1]
    assert r["tokens_per_s"] == pytest.approx(2 * r["tokens_per_s_per_gpu"])  # global = per GPU x world
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["seconds"])
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)
    assert 0 < r["mem_allocated_gib"] and r["mem_peak_gib"] <= r["mem_device_gib"] and r["eta_s"] == 0
    # megatron's "pad token id collides" came from the plugin passing eod = pad = -1: fixed at the source
    assert not [w for w in first["warnings"] if "collides" in w], first["warnings"]

    run_distributed(_train_and_capture, 2, args=(_overrides(dataset, ckpt, log_file, 5), str(tmp_path / "b.json")))
    log = json.loads((tmp_path / "b.json").read_text())["log"]
    assert f"resumed from {ckpt}/iter_0000003 at step 3" in log
    assert [json.loads(line)["step"] for line in log_file.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_pad_id_does_not_collide_with_eod_even_without_a_separator(dataset, tmp_path):
    from megatron_ultralong.data.samples.pretrain import PretrainDataset
    from megatron_ultralong.training.config import load_train_config

    data = load_train_config(None, (f"data.paths=[{dataset}]", "data.seq_length=64",
                                    f"data.cache_dir={tmp_path}")).data
    assert data.eod_token_id is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = PretrainDataset(data, 4, seed=1, vocab_size=1000)
    assert not [w for w in caught if "collides" in str(w.message)]
    sample = ds[0]
    assert sample["loss_mask"].sum() == 64  # no real token is mistaken for padding


class FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_sinks_write_the_step_line_scalars(tmp_path):
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.progress import format_step_line
    from megatron_ultralong.training.sinks import MetricSinks

    train = load_train_config(None, ("data.paths=[x]", f"train.tensorboard_dir={tmp_path / 'tb'}",
                                     f"train.log_file={tmp_path / 'a' / 'm.jsonl'}")).train
    sinks = MetricSinks(train, {}, is_logger=True, tensorboard_factory=FakeWriter)
    metrics = {"step": 7, "total_steps": 9, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5, "applied": True, "seconds": 2.0,
               "tokens_per_s": 1000.0, "tokens_per_s_per_gpu": 125.0, "tflops_per_device": 3.0, "mfu": 0.3,
               "mem_allocated_gib": 1.0, "mem_reserved_gib": 2.0, "mem_peak_gib": 1.5, "mem_device_gib": 80.0,
               "mem_peak_pct": 1.9, "eta_s": 4.0, "loss_tokens": 128}
    sinks.write(metrics)
    line = format_step_line(metrics)
    tb = sinks.tb
    sinks.close()
    got = {tag: (value, step) for tag, value, step in tb.scalars}
    assert got["train/loss"] == (2.5, 7) and got["train/tokens_per_s_per_gpu"] == (125.0, 7)
    assert got["train/mfu"] == (0.3, 7) and got["train/mem_peak_gib"] == (1.5, 7) and tb.closed
    assert "step 7/9" in line and "1,000 tok/s global, 125 tok/s/GPU" in line and "MFU 30.0%" in line
    assert json.loads((tmp_path / "a" / "m.jsonl").read_text()) == metrics


def test_missing_extras_refused_before_anything_starts(monkeypatch, dataset):
    import importlib.util

    import torch.distributed as dist

    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("tensorboard", "wandb") else real(n, *a))
    cfg = load_train_config(None, (f"data.paths=[{dataset}]", "train.tensorboard_dir=tb"))
    with pytest.raises(ValueError, match=r"pip install 'megatron-ultralong\[tensorboard\]'"):
        Trainer(cfg)
    assert not dist.is_initialized()  # refused before the process group, let alone the model
    cfg = load_train_config(None, (f"data.paths=[{dataset}]", "train.wandb_project=p"))
    with pytest.raises(ValueError, match=r"pip install 'megatron-ultralong\[wandb\]'"):
        Trainer(cfg)


def test_wandb_sink_logs_the_same_scalars(monkeypatch, tmp_path):
    """W&B through a stand-in module with wandb's API (init/log/finish), offline-safe by construction."""
    import sys
    import types

    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.sinks import MetricSinks

    calls = []
    fake = types.ModuleType("wandb")
    run = types.SimpleNamespace(log=lambda d, step: calls.append(("log", d, step)), finish=lambda: calls.append("finish"))
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train = load_train_config(None, ("data.paths=[x]", "train.wandb_project=ultralong")).train
    sinks = MetricSinks(train, {"train": {"steps": 3}}, is_logger=True)
    sinks.write({"step": 2, "loss": 1.0, "lr": 0.1})
    sinks.close()
    assert calls[0] == ("init", {"project": "ultralong", "name": None, "config": {"train": {"steps": 3}},
                                 "resume": "allow"})
    assert calls[1:] == [("log", {"train/loss": 1.0, "train/lr": 0.1}, 2), "finish"]
