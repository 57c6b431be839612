"""A resume says what it changes, applies a new schedule only when asked, and refuses another model.

Train 4 steps of cosine decay (lr 3e-3 -> min_lr 3e-5), then resume with train.steps=8,
optim.lr=1e-2, optim.min_lr=1e-3:
- by default megatron-core's scheduler keeps the checkpoint's schedule (`_check_and_set`): steps
  5-8 run at the old floor 3e-5, and the log names every changed field;
- with train.override_schedule=true the new cosine applies from step 5: the lr of each step is
  compared with the cosine formula computed here (megatron-core's `get_lr`: min + (max - min) *
  0.5 * (1 + cos(pi * n / decay_steps)), n = steps already taken; the lr recorded is the one the
  optimizer step applied);
- an override whose schedule ended before the checkpoint's step is refused, and so is resuming
  the run into a model with another RoPE (the 4M job resuming the 1M run's checkpoint).
"""
import json
import math

import pytest

from dist_utils import run_distributed
from test_train_loop import _make_dataset, _overrides


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "arith")
    _make_dataset(prefix)
    return prefix


def _lrs(overrides):
    """(step, the lr the optimizer actually applied in it) for every step the run trains."""
    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.trainer import Trainer

    trainer = Trainer(load_train_config(None, overrides))
    applied, step = [], trainer.optimizer.step

    def recording_step():
        applied.append(trainer.optimizer.param_groups[0]["lr"])
        return step()

    trainer.optimizer.step = recording_step
    history = trainer.train()
    return [(h["step"], lr) for h, lr in zip(history, applied)] + [list(trainer.optimizer.param_groups[0]["betas"])]


def _body(rank, world_size, dataset, tmp, out):
    from megatron_ultralong.logs import setup_logging

    log = open(f"{tmp}/train.log", "a")
    setup_logging(stream=log)
    base = {"optim.warmup_steps": 0, "optim.decay_style": "cosine", "optim.lr": 3e-3, "optim.min_lr": 3e-5}
    first = _lrs(_overrides(dataset, **base, **{"train.steps": 4, "train.save": f"{tmp}/ckpt"}))
    changed = {**base, "train.steps": 8, "optim.lr": 1e-2, "optim.min_lr": 1e-3, "optim.adam_beta2": 0.99,
               "train.load": f"{tmp}/ckpt"}
    mark = log.tell()
    kept = _lrs(_overrides(dataset, **changed, **{"train.save": f"{tmp}/kept"}))
    log.flush()
    kept_log = open(f"{tmp}/train.log").read()[mark:]
    override = _lrs(_overrides(dataset, **changed, **{"train.save": f"{tmp}/new", "train.override_schedule": True}))
    errors = {}
    for name, extra in (("ended", {**changed, "train.steps": 4, "train.override_schedule": True}),
                        ("rope", {**changed, "model.yarn": "{target: 4096, original: 1024}"})):
        try:
            _lrs(_overrides(dataset, **extra, **{"train.save": f"{tmp}/{name}"}))
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"first": first, "kept": kept, "kept_log": kept_log, "override": override, "errors": errors}, f)


def test_resume_reports_changed_schedule_and_applies_it_only_on_request(dataset, tmp_path):
    out = tmp_path / "r.json"
    run_distributed(_body, 1, args=(dataset, str(tmp_path), str(out)))
    r = json.loads(out.read_text())

    def cosine(n, hi, lo, steps):
        return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * min(n, steps) / steps))
    *r["first"], _ = r["first"]
    *r["kept"], kept_betas = r["kept"]
    *r["override"], override_betas = r["override"]
    assert [s for s, _ in r["first"]] == [1, 2, 3, 4]
    assert [lr for _, lr in r["first"]] == pytest.approx([cosine(n, 3e-3, 3e-5, 4) for n in range(4)], rel=1e-9)

    # Default: the checkpoint's schedule continues (its decay ended at step 4: the floor), said by name.
    assert [s for s, _ in r["kept"]] == [5, 6, 7, 8]
    assert [lr for _, lr in r["kept"]] == pytest.approx([3e-5] * 4, rel=1e-9)
    text = r["kept_log"]
    assert "keeps the checkpoint's schedule and optimizer settings, NOT this run's" in text
    for field in ("optim.lr: checkpoint 0.003, this run 0.01", "optim.min_lr: checkpoint 3e-05, this run 0.001",
                  "train.steps: checkpoint 4, this run 8", "steps 5-8 run at its min_lr 3e-05",
                  "optim.adam_beta2: checkpoint 0.95, this run 0.99",
                  "train.override_schedule=true"):
        assert field in text, field

    # train.override_schedule=true: the new cosine (1e-2 -> 1e-3 over 8 steps) from step 5 on.
    assert [s for s, _ in r["override"]] == [5, 6, 7, 8]
    assert [lr for _, lr in r["override"]] == pytest.approx([cosine(n, 1e-2, 1e-3, 8) for n in range(4, 8)], rel=1e-9)
    assert kept_betas == [0.9, 0.95] and override_betas == [0.9, 0.99]  # torch's load keeps the saved ones

    assert "train.override_schedule=true with train.steps=4" in r["errors"]["ended"]
    rope = r["errors"]["rope"]
    assert rope is not None and f"{tmp_path}/ckpt/iter_0000004 was trained as another model" in rope
    assert "rope.rope_type: 'default' vs 'yarn'" in rope and "max_position_embeddings" in rope
    assert "model.config=tiny with model.yarn.target=4096" in rope


def test_override_schedule_without_a_run_to_resume_is_refused():
    from megatron_ultralong.training.config import load_train_config

    with pytest.raises(ValueError, match="train.override_schedule=true needs train.load"):
        load_train_config(None, ("data.paths=[x]", "train.override_schedule=true"))


def test_scheduler_keeps_norms_free_of_weight_decay():
    """megatron's scheduler rewrites each group's weight_decay every step (x wd_mult): the 1-D
    parameters (norms) must stay at 0 on the CPU optimizer, as megatron's own groups do."""
    import torch

    from megatron_ultralong.training.config import load_train_config
    from megatron_ultralong.training.optimizer import CPUAdamW, build_scheduler

    cfg = load_train_config(None, ("data.paths=[x]", "optim.weight_decay=0.1"))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.LayerNorm(3, bias=False))
    optimizer = CPUAdamW(model, cfg.optim, None)
    scheduler = build_scheduler(optimizer, cfg)
    scheduler.step(increment=1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
