"""The training loop on CPU/gloo: learning, exact resume, CP=2 against CP=1, clear config errors."""
import json
import os

import numpy as np
import pytest
import torch

from dist_utils import run_distributed

EOD = 999


def _make_dataset(prefix: str, docs: int = 120) -> None:
    """Arithmetic sequences over 61 token ids (learnable), each closed by EOD, as a megatron indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(docs):
        n = int(rng.integers(5, 90))
        start, stride = int(rng.integers(1, 61)), int(rng.integers(1, 5))
        doc = list((start + stride * np.arange(n)) % 61 + 1) + [EOD]
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "arith")
    _make_dataset(prefix)
    return prefix


def _overrides(dataset, **extra):
    base = {
        "data.paths": f"[{dataset}]", "data.seq_length": 64, "data.eod_token_id": EOD,
        "train.steps": 6, "train.global_batch_size": 2, "train.micro_batch_size": 1,
        "optim.lr": 0.003, "optim.warmup_steps": 2, "optim.decay_style": "cosine",
        "train.log_interval": 100,
    }
    base.update(extra)
    return tuple(f"{k}={v}" for k, v in base.items())


def _train(rank, world_size, overrides, out_file):
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    trainer = Trainer(load_train_config(None, overrides))
    history = trainer.train()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump([{k: h[k] for k in ("step", "loss", "grad_norm", "lr", "loss_tokens")} for h in history], f)


def _train_then_die(rank, world_size, overrides, out_file, steps):
    """Train `steps` of a longer run, checkpoint, and stop as if the job were killed."""
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    trainer = Trainer(load_train_config(None, overrides))
    history = [trainer.train_step() for _ in range(steps)]
    trainer.save()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump([{k: h[k] for k in ("step", "loss", "grad_norm", "lr", "loss_tokens")} for h in history], f)


def _run(world_size, overrides, out_file):
    run_distributed(_train, world_size, args=(overrides, str(out_file)))
    with open(out_file) as f:
        return json.load(f)


def test_loss_falls(dataset, tmp_path):
    hist = _run(1, _overrides(dataset, **{"train.steps": 25, "optim.lr": 0.01}), tmp_path / "h.json")
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < first - 1.0, (first, last)
    assert hist[0]["lr"] < hist[2]["lr"]  # warmup
    assert all(h["loss_tokens"] == 2 * 64 for h in hist)


def test_resume_continues_bitwise(dataset, tmp_path):
    straight = _run(1, _overrides(dataset), tmp_path / "a.json")
    ckpt = tmp_path / "ckpt"
    run_distributed(_train_then_die, 1, args=(_overrides(dataset, **{"train.save": ckpt}), str(tmp_path / "b.json"), 3))
    first = json.loads((tmp_path / "b.json").read_text())
    # A save that was killed half-way must be ignored: `latest` still names iter 3.
    (ckpt / ".iter_0000004.partial").mkdir()
    resumed = _run(1, _overrides(dataset, **{"train.save": ckpt, "train.load": ckpt, "train.save_interval": 3}),
                   tmp_path / "c.json")
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [h["loss"] for h in first + resumed] == [h["loss"] for h in straight]
    assert [h["grad_norm"] for h in first + resumed] == [h["grad_norm"] for h in straight]
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert (ckpt / "iter_0000006" / "model" / "config.json").is_file()


def test_cp2_tracks_cp1_and_dp2(dataset, tmp_path):
    cp1 = _run(1, _overrides(dataset), tmp_path / "cp1.json")
    cp2 = _run(2, _overrides(dataset, **{"parallel.context_parallel": 2}), tmp_path / "cp2.json")
    dp2 = _run(2, _overrides(dataset), tmp_path / "dp2.json")
    for other in (cp2, dp2):
        np.testing.assert_allclose([h["loss"] for h in other], [h["loss"] for h in cp1], rtol=2e-5)
        np.testing.assert_allclose([h["grad_norm"] for h in other], [h["grad_norm"] for h in cp1], rtol=1e-4)


def test_document_mask_changes_training_and_is_exact_under_cp(dataset, tmp_path):
    masked = _overrides(dataset, **{"data.document_mask": "true", "train.steps": 3})
    cp1 = _run(1, masked, tmp_path / "m1.json")
    cp2 = _run(2, masked + ("parallel.context_parallel=2", "parallel.cp_comm_type=all_gather"), tmp_path / "m2.json")
    plain = _run(1, _overrides(dataset, **{"train.steps": 3}), tmp_path / "p.json")
    np.testing.assert_allclose([h["loss"] for h in cp2], [h["loss"] for h in cp1], rtol=2e-5)
    assert cp1[0]["loss"] != plain[0]["loss"]  # the mask really reached the attention


@pytest.mark.parametrize("overrides,match", [
    (("data.seq_length=66", "parallel.context_parallel=2"), r"data.seq_length=66 is not divisible by 2 x"),
    (("train.global_batch_size=3", "train.micro_batch_size=2"), r"train.global_batch_size=3 is not a multiple"),
    (("optim.lr=-1",), r"optim.lr=-1.0"),
    (("model.recompute=everything",), r"model.recompute='everything'"),
    (("model.recompute_modules=[attention]",), r"model.recompute_modules\[0\]='attention'"),
    (("model.recompute=selective", "model.recompute_modules=[]"), r"needs model.recompute_modules"),
])
def test_bad_configs_are_named(overrides, match):
    from megatron_ultralong.training.config import load_train_config

    with pytest.raises(ValueError, match=match):
        load_train_config(None, ("data.paths=[x]",) + overrides)


def _world_checks(rank, world_size, dataset):
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    cases = [
        (("parallel.tensor_parallel=3",), r"world size 2 is not divisible by TP\*PP\*CP = 3"),
        (("parallel.tensor_parallel=2", "train.global_batch_size=1"), None),
        (("data.paths=[/nope/x]",), r"data.paths: /nope/x.bin does not exist"),
        (("data.seq_length=16384",), r"exceeds the model's max_position_embeddings=8192"),
    ]
    for extra, match in cases:
        base = ("data.paths=[%s]" % dataset, "data.seq_length=64", "train.steps=1", "train.global_batch_size=2")
        cfg = load_train_config(None, base + extra)
        if match is None:
            Trainer(cfg).train()  # TP=2 trains
            continue
        with pytest.raises(ValueError, match=match):
            Trainer(cfg)


def test_start_up_checks_name_the_problem(dataset):
    run_distributed(_world_checks, 2, args=(dataset,))


def _sft_body(rank, world_size, overrides, out_file):
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.data.samples.pretrain import build_sample_dataset
    from megatron_ultralong.training.trainer import Trainer

    cfg = load_train_config(None, overrides)
    trainer = Trainer(cfg)
    history = trainer.train()
    # The step's loss tokens are exactly the assistant tokens of the rows it read (the SFT dataset's
    # mask is checked against transformers' own assistant mask in tests/test_sft_dataset.py).
    dataset = build_sample_dataset(cfg.data, 0, cfg.train.seed, 0)
    expected = [sum(dataset[i]["loss_mask"].sum().item() for i in (2 * s, 2 * s + 1)) for s in range(len(history))]
    assert [h["loss_tokens"] for h in history] == expected
    assert history[-1]["loss"] < history[0]["loss"]


def test_sft_trains_on_assistant_tokens_only(tmp_path):
    from sft_helpers import conversation, write_jsonl, write_tokenizer

    tok = write_tokenizer(str(tmp_path))
    data = write_jsonl(str(tmp_path / "chat.jsonl"), [conversation(k, turns=1 + k % 2) for k in range(40)])
    overrides = (
        "data.kind=sft", f"data.paths=[{data}]", f"data.tokenizer={tok}", "data.seq_length=128",
        "data.document_mask=true", "data.reset_position_ids=true", "model.config=tiny",
        "train.steps=4", "train.global_batch_size=2", "optim.lr=0.01",
    )
    run_distributed(_sft_body, 1, args=(overrides, str(tmp_path / "h.json")))
