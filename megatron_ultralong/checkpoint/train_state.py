"""Training checkpoints: model, optimizer, scheduler, RNG and data position, atomically and verified.

Layout of `<save>/iter_XXXXXXX/` (written as `.iter_XXXXXXX.partial`, renamed when complete; the
`latest` file is replaced only after the rename, so a job killed mid-save resumes from the previous
complete checkpoint):

    model/            megatron-core torch_dist checkpoint of the weights (checkpoint/torch_dist.py):
                      loadable at any TP/PP, and by `mcore-to-hf` and the evaluator directly
    optimizer/        optimizer state (training/optimizer.py decides the format)
    rng/rank_NNNNN.pt per-rank RNG states as tensors and lists (loaded with weights_only=True)
    trainer_state.json step, consumed samples, scheduler state, the config it ran with
    manifest.json     size and CRC-32 of every file above (checkpoint/manifest.py), written last

Resume (`resume_candidates` + `load_train_checkpoint`): `latest` names the checkpoint; if it is
missing, names something outside the save directory, or names an iteration that is incomplete or
fails its checksums, the newest complete iteration that verifies is used instead, and the log says
which and why. The caller's `check` sees each candidate's trainer_state.json before anything is
verified or loaded, and may refuse it (the trainer refuses another model's run and reports a
changed schedule). Nothing read from a checkpoint is unpickled freely: `.pt` files load with
weights_only=True, and the model goes through the one read path (checkpoint/vetted_load.py).

An `iter_*` entry that is a symbolic link is not this run's checkpoint: resume, retention and the
save-directory check ignore it (with a warning), as `latest` refuses to name one.

Retention (`apply_retention`): after a new checkpoint is complete, fsynced and named by `latest`,
older iterations beyond `keep_last` (except multiples of `keep_every`) are removed: renamed to a
hidden `.iter_XXXXXXX.deleting` first, so a half-deleted directory never looks like a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_ultralong.checkpoint.manifest import (
    MANIFEST,
    CheckpointCorruptError,
    fsync_dir,
    verify_manifest,
    write_file_durably,
    write_manifest,
)
from megatron_ultralong.checkpoint.paths import ITER_NAME, LATEST, MODEL_SUBDIR, STATE, pointer_target
from megatron_ultralong.checkpoint.torch_dist import (
    begin_atomic_dir,
    finish_atomic_dir,
    load_megatron_checkpoint,
    save_megatron_checkpoint,
)

logger = logging.getLogger(__name__)

LAYOUT_FIELDS = ("tensor_parallel", "pipeline_parallel")
"""Parallel sizes a resume must keep: the optimizer state is sharded by them (CPU: per rank; GPU:
megatron's distributed optimizer). CP and DP may change (the model checkpoint is layout-free and the
CPU optimizer state is replicated over DP x CP)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iteration_dirs(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `iter_XXXXXXX` directory under save_dir, oldest first. A symbolic link
    named like one is skipped with a warning: it is no checkpoint this run wrote, and following it
    would let retention delete, or resume load, a directory outside the save directory."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = ITER_NAME.match(p.name)
        if not m:
            continue
        if p.is_symlink():
            logger.warning("%s is a symbolic link: ignored (not resumed from, never deleted)", p)
            continue
        if p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_complete(path: Path) -> bool:
    """A checkpoint the save finished. Every file is written under the `.partial` name and the
    directory renamed at the end, so an `iter_` directory without its state file was damaged after
    the fact (half deleted, copied partly). Whether its files are intact is `verify_checkpoint`'s job."""
    return (path / STATE).is_file()


# --- RNG states as tensors and lists: loadable with weights_only=True (no pickled objects) ---

def _rng_state(use_cuda: bool) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if use_cuda:
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = dict(tensor_parallel.get_cuda_rng_tracker().get_states())
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# --- save ---

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
    keep_last: Optional[int] = None,
    keep_every: Optional[int] = None,
) -> Path:
    """Collective: every rank calls it. `model` is the unwrapped UltraLongGPTModel stage.
    side_files (the tokenizer of the starting checkpoint) travel with the weights to HF export.

    A complete `iter_<step>` that already exists is kept, never re-saved in place (a re-run of a
    finished job would otherwise leave a window with no usable checkpoint); `latest` is pointed at it.
    """
    final = Path(save_dir) / f"iter_{step:07d}"
    if is_complete(final):
        logger.warning("%s already exists and is complete: not re-saving it in place", final)
        _point_latest(save_dir, final)
        return final
    tmp = begin_atomic_dir(final, overwrite=True)
    rank = _rank()
    if rank == 0:
        (tmp / "optimizer").mkdir()
        (tmp / "rng").mkdir()
    _barrier()
    save_megatron_checkpoint(model, tmp / MODEL_SUBDIR, extra={"step": step}, side_files=side_files, overwrite=True,
                             manifest=False)  # the iteration's manifest below covers model/
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
        write_file_durably(tmp / STATE, json.dumps(state, indent=2))
    _barrier()
    write_manifest(tmp)  # collective: hashes and fsyncs every file, rank 0 writes manifest.json
    finish_atomic_dir(tmp, final)
    _point_latest(save_dir, final)
    if rank == 0 and (keep_last or keep_every):
        apply_retention(save_dir, keep_last, keep_every, protect=final)
    _barrier()
    return final


def _point_latest(save_dir: str, final: Path) -> None:
    if _rank() == 0:
        fsync_dir(Path(save_dir))  # the iter_ rename is durable before `latest` names it
        write_file_durably(Path(save_dir) / LATEST, final.name + "\n")
    _barrier()


def apply_retention(save_dir: str, keep_last: Optional[int], keep_every: Optional[int], protect: Path) -> list[Path]:
    """Rank 0: delete complete iterations other than the newest `keep_last` (None: keep all), the
    multiples of `keep_every`, and `protect` (the one `latest` names). Returns the deleted paths."""
    if not keep_last:
        return []
    iters = [(s, p) for s, p in iteration_dirs(save_dir) if is_complete(p)]
    keep = {p for _, p in iters[-keep_last:]} | {Path(protect)}
    if keep_every:
        keep |= {p for s, p in iters if s % keep_every == 0}
    deleted = []
    for _, path in iters:
        if path in keep:
            continue
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)  # never visible as a half-deleted iter_ directory
        shutil.rmtree(doomed)
        deleted.append(path)
        logger.info("retention: deleted %s (train.keep_last=%s, train.keep_every=%s)", path, keep_last, keep_every)
    if deleted:
        fsync_dir(Path(save_dir))
    return deleted


# --- find and load ---

def _pointer_target(load_dir: Path) -> tuple[Optional[Path], str]:
    """The complete iteration `latest` names, or (None, why not): checkpoint/paths.py's rules."""
    return pointer_target(load_dir, require_complete=True)


def resume_candidates(load_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints to try, in order: the one `latest` names, then every other complete iteration,
    newest first. Logs (warning) why `latest` is not the first. Empty: nothing to resume."""
    root = Path(load_dir)
    target, why = _pointer_target(root)
    others = [p for _, p in reversed(iteration_dirs(root)) if p != target and is_complete(p)]
    if target is None and others:
        logger.warning("%s; falling back to the newest complete checkpoint, %s", why, others[0])
    return ([target] if target is not None else []) + others


def read_train_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint, with a one-line error naming the file and the field."""
    file = Path(path) / STATE
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorruptError(f"{file}: not valid JSON ({e})") from e
    for key in ("step", "consumed_samples", "scheduler", "world_size", "config"):
        if key not in state:
            raise CheckpointCorruptError(f"{file}: field {key!r} is missing")
    return state


def check_layout(path: Path, state: dict, parallel: dict) -> None:
    """Refuse a resume at a TP/PP the optimizer state was not saved at, before anything loads."""
    saved = (state.get("config") or {}).get("parallel") or {}
    diffs = [f"parallel.{k}: saved {saved.get(k, 1)}, requested {parallel.get(k, 1)}"
             for k in LAYOUT_FIELDS if saved.get(k, 1) != parallel.get(k, 1)]
    if diffs:
        raise ValueError(
            f"{path} was saved at another layout ({'; '.join(diffs)}): the optimizer state is sharded by "
            "TP/PP, so resume with the saved layout (the weights alone load at any TP via "
            "model.megatron_checkpoint=<checkpoint>/model)"
        )


def _named(what: str, fn):
    """Run a loader; turn a low-level failure (truncated zip, short read...) into one line naming the file."""
    try:
        return fn()
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - torch/zip/megatron raise many types for a bad file
        raise CheckpointCorruptError(f"{what} could not be loaded: {type(e).__name__}: {e}") from e


def verify_checkpoint(path: Path) -> Optional[str]:
    """Collective: None if every file matches the manifest, else the reason (same on every rank)."""
    try:
        return verify_manifest(path)
    except CheckpointCorruptError as e:
        return str(e)


def load_train_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, parallel: Optional[dict] = None
) -> tuple[int, int]:
    """Restore everything `save_train_checkpoint` wrote; returns (step, consumed_samples).
    parallel: the run's `parallel` config section (dict), checked against the saved layout first.
    The caller has verified the whole iteration against its manifest (`resume`)."""
    path = Path(path)
    state = read_train_state(path)
    if parallel is not None:
        check_layout(path, state, parallel)
    world = dist.get_world_size() if dist.is_initialized() else 1
    _named(f"{path / MODEL_SUBDIR}",
           lambda: load_megatron_checkpoint(model, path / MODEL_SUBDIR, manifest_checked=True))
    _named(f"{path / 'optimizer'}", lambda: optimizer.load(str(path / "optimizer"), model.sharded_state_dict()))
    _named(f"{path / STATE} (scheduler)", lambda: scheduler.load_state_dict(state["scheduler"]))
    rng = path / "rng" / f"rank_{_rank():05d}.pt"
    if state["world_size"] == world and rng.is_file():
        _named(str(rng), lambda: _set_rng_state(torch.load(rng, weights_only=True)))
    return int(state["step"]), int(state["consumed_samples"])


def _quarantine(path: Path) -> None:
    """Collective: rename a checkpoint that failed verification out of the iter_ namespace, so the
    resumed run re-saves that step instead of keeping (and pointing `latest` at) the bad copy."""
    _barrier()  # every rank has finished reading it
    if _rank() == 0:
        doomed = path.with_name(f".{path.name}.corrupt")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        fsync_dir(path.parent)
    _barrier()


def resume(
    load_dir: str, model: torch.nn.Module, optimizer: Any, scheduler: Any, parallel: Optional[dict] = None,
    check: Optional[Callable[[Path, dict], None]] = None,
) -> Optional[tuple[Path, int, int]]:
    """Collective: load the newest checkpoint under load_dir that verifies; None if there is none.

    check(path, trainer_state) runs on each candidate before it is verified or loaded (every rank);
    it raises to refuse the checkpoint (a refusal stops the resume: the run belongs elsewhere). A
    checkpoint whose files fail the manifest check is skipped with a warning naming the file; if
    every one fails, raises CheckpointCorruptError (starting from scratch would overwrite the run)."""
    candidates = resume_candidates(load_dir)
    failures = []
    for path in candidates:
        if check is not None:
            try:
                state = read_train_state(path)
            except CheckpointCorruptError:
                state = None  # the manifest check below names the damage and falls back
            if state is not None:
                check(path, state)
        problem = verify_checkpoint(path)
        if problem is not None:
            failures.append((path, problem))
            logger.warning("%s fails its checksum manifest: %s; trying an older checkpoint", path, problem)
            continue
        if not (path / MANIFEST).is_file():
            logger.warning("%s has no %s (saved before manifests existed): loading it unverified", path, MANIFEST)
        step, consumed = load_train_checkpoint(path, model, optimizer, scheduler, parallel)
        for bad, _ in failures:
            _quarantine(bad)
            logger.warning("moved %s to .%s.corrupt: step %d onwards is trained again from %s",
                           bad, bad.name, step + 1, path)
        return path, step, consumed
    if failures:
        raise CheckpointCorruptError(
            f"no checkpoint under {load_dir} verifies; newest failure: {failures[0][1]}"
        )
    return None


# --- the save directory belongs to one run ---

def save_dir_conflict(save_dir: Optional[str], resumed_from: Optional[Path], overwrite: bool) -> Optional[str]:
    """An error line if `save_dir` holds checkpoints this run did not resume from (a misspelled
    train.load would otherwise start from scratch and replace them), unless `overwrite`; with it,
    they are moved aside (never deleted) and None is returned. Rank 0 only."""
    if not save_dir:
        return None
    root = Path(save_dir)
    if resumed_from is not None and Path(resumed_from).parent.resolve() == root.resolve():
        return None  # continuing the run that lives here
    theirs = [p for _, p in iteration_dirs(root)]
    if not theirs:
        return None
    if not overwrite:
        origin = f"resumed from {resumed_from}" if resumed_from is not None else "starts from scratch"
        return (f"train.save={save_dir} holds checkpoints of another run ({theirs[-1].name} and "
                f"{len(theirs) - 1} more) but this run {origin}: set train.load={save_dir} to continue "
                f"that run, or train.overwrite=true to move them aside and start over")
    aside = root / f".overwritten-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in theirs + ([root / LATEST] if (root / LATEST).exists() else []):
        os.replace(p, aside / p.name)
    fsync_dir(root)
    logger.warning("train.overwrite=true: moved %d checkpoint(s) of an earlier run from %s to %s (delete it "
                   "when no longer needed)", len(theirs), save_dir, aside)
    return None
