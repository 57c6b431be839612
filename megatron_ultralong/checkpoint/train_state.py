"""Training checkpoints: model, optimizer, scheduler, RNG and data position, atomically.

Layout of `<save>/iter_XXXXXXX/` (written as `.iter_XXXXXXX.partial`, renamed when complete; the
`latest` file is replaced only after the rename, so a job killed mid-save resumes from the previous
complete checkpoint):

    model/            megatron-core torch_dist checkpoint of the weights (checkpoint/torch_dist.py):
                      loadable at any TP/PP, and by `mcore-to-hf` and the evaluator directly
    optimizer/        optimizer state (training/optimizer.py decides the format)
    rng/rank_NNNNN.pt per-rank RNG states (torch, numpy, python; CUDA tracker on GPU)
    trainer_state.json step, consumed samples, scheduler state, the config it ran with
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_ultralong.checkpoint.torch_dist import (
    begin_atomic_dir,
    finish_atomic_dir,
    load_megatron_checkpoint,
    save_megatron_checkpoint,
)

LATEST = "latest"
STATE = "trainer_state.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_state(use_cuda: bool) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if use_cuda:
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_train_checkpoint(
    save_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    consumed_samples: int,
    config_dict: dict,
    use_cuda: bool,
    side_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Collective: every rank calls it. `model` is the unwrapped UltraLongGPTModel stage.
    side_files (the tokenizer of the starting checkpoint) travel with the weights to HF export."""
    final = Path(save_dir) / f"iter_{step:07d}"
    tmp = begin_atomic_dir(final, overwrite=True)
    rank = _rank()
    if rank == 0:
        (tmp / "optimizer").mkdir()
        (tmp / "rng").mkdir()
    if dist.is_initialized():
        dist.barrier()
    save_megatron_checkpoint(model, tmp / "model", extra={"step": step}, side_files=side_files, overwrite=True)
    optimizer.save(str(tmp / "optimizer"), model.sharded_state_dict())
    torch.save(_rng_state(use_cuda), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        state = {
            "step": step,
            "consumed_samples": consumed_samples,
            "scheduler": scheduler.state_dict(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "config": config_dict,
        }
        (tmp / STATE).write_text(json.dumps(state, indent=2))
    finish_atomic_dir(tmp, final)
    if rank == 0:
        pointer = Path(save_dir) / LATEST
        tmp_pointer = pointer.with_suffix(".tmp")
        tmp_pointer.write_text(final.name + "\n")
        os.replace(tmp_pointer, pointer)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest_checkpoint(load_dir: str) -> Optional[Path]:
    """The last complete checkpoint under `load_dir`, or None if there is none yet."""
    pointer = Path(load_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(load_dir) / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def load_train_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> tuple[int, int]:
    """Restore everything `save_train_checkpoint` wrote; returns (step, consumed_samples)."""
    state = json.loads((path / STATE).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    load_megatron_checkpoint(model, path / "model")
    optimizer.load(str(path / "optimizer"), model.sharded_state_dict())
    scheduler.load_state_dict(state["scheduler"])
    rng = path / "rng" / f"rank_{_rank():05d}.pt"
    if state["world_size"] == world and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(state["step"]), int(state["consumed_samples"])
