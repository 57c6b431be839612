"""Save and load the plugin's model as a Megatron-Core distributed checkpoint (`torch_dist`).

This is the checkpoint API the trainer, the evaluator and the converters share:

    save_megatron_checkpoint(model, path)        # collective over the default group
    info = load_megatron_checkpoint(model, path) # any TP/PP/DP; megatron reshards on load
    info = read_checkpoint_info(path)            # model config etc., no model needed

The directory is megatron-core's own `torch_dist` layout (`metadata.json`, `common.pt`, `.metadata`,
`__<rank>_<i>.distcp`: global tensors, TP/PP-agnostic) plus two small files of ours:
`ultralong_checkpoint.json` (the plugin's `LlamaConfig`, dtype, vocab padding rule, free-form extras)
and `config.json` (the transformers config, RoPE scaling included), so `mcore-to-hf` and any later
tool rebuild the model with no extra flags.

CPU/gloo: megatron-core's `TorchDistSaveShardedStrategy` stages tensors with
`torch.cuda.synchronize()` and writes from forked processes (megatron/core/dist_checkpointing/
strategies/filesystem_async.py; the async path hangs under gloo), so on CPU we keep megatron's translation (`mcore_to_pyt_state_dict`, `MCoreSavePlanner`,
same keys, same metadata) and swap only the writer for torch's synchronous `FileSystemWriter`. The
bytes on disk are the same format; megatron's own loader reads them on GPU or CPU.

Atomicity: every rank writes into `<parent>/.<name>.partial`; rank 0 renames it to `path` after a
barrier, so an interrupted save never leaves a directory that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch import Tensor, nn

from megatron_ultralong.checkpoint.info import INFO_FILE, CheckpointInfo, read_checkpoint_info
from megatron_ultralong.checkpoint.manifest import write_manifest
from megatron_ultralong.checkpoint.paths import require_megatron_checkpoint
from megatron_ultralong.checkpoint.vetted_load import verify_model_manifest, vetted_load
from megatron_ultralong.dtypes import dtype_name
from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.model.gpt import DEFAULT_VOCAB_DIVISIBLE_BY

__all__ = ["INFO_FILE", "CheckpointInfo", "read_checkpoint_info", "save_megatron_checkpoint",
           "load_megatron_checkpoint", "check_compatible"]

HF_CONFIG_FILE = "config.json"
SIDE_DIR = "hf_files"
"""Subdirectory for files carried to the HF side on export (tokenizer, generation config)."""


Materialize = Callable[[Tensor], Tensor]
"""Called with each model tensor (or a view of one) right before it is written; returns the data
to write in its place (same shape and dtype)."""


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's `torch_dist` save with torch's synchronous writer (no CUDA, no fork).

    Same backend name and version, so `metadata.json` and the loader are megatron's own.
    materialize: see `Materialize`; with it the model's own tensors are used for their shapes only.
    """

    def __init__(self, materialize: Optional[Materialize] = None) -> None:
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self.materialize = materialize

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state = mcore_to_pyt_state_dict(state, False)
        kwargs = dict(dedup_replicated_tensors=False, flatten_state_dict=False)
        planner = MCoreSavePlanner(**kwargs) if self.materialize is None else \
            _MaterializingSavePlanner(self.materialize, **kwargs)
        # thread_count=1: torch's writer resolves (materialises) the next tensor only after writing
        # the last (`_SerialCpuLoader`; with CUDA present `_OverlappingCpuLoader` runs at most
        # `per_thread_copy_ahead` = 10 MB ahead), so each materialised tensor is freed once written.
        dcp.save(pyt_state, storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1), planner=planner)


class _MaterializingSavePlanner(MCoreSavePlanner):
    """megatron's save planner (same plan, keys and metadata) whose tensor data comes from a
    `Materialize` hook when the writer asks for it."""

    def __init__(self, materialize: Materialize, **kwargs) -> None:
        super().__init__(**kwargs)
        self._materialize = materialize

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        return self._materialize(data) if isinstance(data, Tensor) else data


def save_strategy_for(device: torch.device, materialize: Optional[Materialize] = None):
    """megatron-core's default on GPU; the synchronous CPU writer elsewhere or to materialise."""
    if device.type == "cuda" and materialize is None:
        return TorchDistSaveShardedStrategy("torch_dist", 1)
    return SyncTorchDistSaveStrategy(materialize)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _params_dtype(model: nn.Module) -> str:
    dtype = next(p for p in model.parameters()).dtype
    return dtype_name(dtype)


def partial_dir(path: Path) -> Path:
    """Where an in-progress save writes: a hidden sibling, renamed into place at the end."""
    return path.parent / f".{path.name}.partial"


def begin_atomic_dir(path: Path, overwrite: bool) -> Path:
    """Collective: rank 0 clears a stale `.partial` dir and creates a fresh one; returns it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = partial_dir(path)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def finish_atomic_dir(tmp: Path, path: Path) -> None:
    """Collective: after every rank wrote, rank 0 swaps `tmp` into `path` (replacing it)."""
    _barrier()
    if _rank() == 0:
        if path.exists():
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    _barrier()


def save_megatron_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_config: Optional[LlamaConfig] = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    extra: Optional[dict[str, Any]] = None,
    side_files: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    materialize: Optional[Materialize] = None,
    manifest: bool = True,
) -> Path:
    """Save this rank's model stage into a `torch_dist` checkpoint at `path` (collective: every
    rank of the default group calls it). Returns the final path.

    model: an `UltraLongGPTModel` stage (any TP/PP/DP). model_config defaults to
    `model.model_config`. Only the main replica of each shard is written (DP ranks dedup).
    side_files (tokenizer files...) are copied into `<path>/hf_files/` and come back out on export.
    overwrite: replace an existing `path` (atomically, after the new checkpoint is complete).
    materialize: produce each tensor's data as it is written (`Materialize`), so a model whose
    weights were never filled can be saved with one weight in memory at a time (hf-to-mcore).
    manifest: write `manifest.json` (CRC-32 per file, checked by every load); False when the caller
    writes one for a directory above (a training checkpoint's iter_*/manifest.json).
    """
    path = Path(path)
    cfg = model_config or model.model_config
    info = CheckpointInfo(cfg, _params_dtype(model), vocab_divisible_by, dict(extra or {}))
    json.dumps(info.extra)  # fail before writing anything if extras are not JSON
    tmp = begin_atomic_dir(path, overwrite)
    device = next(model.parameters()).device
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp), sharded_strategy=save_strategy_for(device, materialize))
    if _rank() == 0:
        _write_json(tmp / INFO_FILE, info.to_json())
        _write_json(tmp / HF_CONFIG_FILE, cfg.to_hf(torch_dtype=info.params_dtype))
        if side_files:
            (tmp / SIDE_DIR).mkdir()
            for f in side_files:
                shutil.copy2(f, tmp / SIDE_DIR / Path(f).name)
    _barrier()
    if manifest:
        write_manifest(tmp)  # collective
    finish_atomic_dir(tmp, path)
    return path


def check_compatible(model_config: LlamaConfig, saved: LlamaConfig, path: Path) -> None:
    """Refuse a checkpoint whose architecture differs from the model's (naming the fields).

    RoPE and max_position_embeddings may differ: extending the context of a loaded model is the point
    of the recipe, and they do not change any weight's shape."""
    ignore = {"rope", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
    diffs = [
        f"{k}: checkpoint {getattr(saved, k)!r} vs model {getattr(model_config, k)!r}"
        for k in asdict(saved)
        if k not in ignore and getattr(saved, k) != getattr(model_config, k)
    ]
    if diffs:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(diffs))


def load_megatron_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                             allow_unverified: bool = False, manifest_checked: bool = False) -> CheckpointInfo:
    """Load a `torch_dist` checkpoint into this rank's model stage, at any TP/PP/DP (collective).

    path: a model directory, an iter_* directory or a save directory (checkpoint/paths.py). The one
    read path (checkpoint/vetted_load.py): the manifest is checked first (allow_unverified: skip it,
    on the user's explicit request; manifest_checked: the caller already did, e.g. resume), `.metadata`
    is vetted and read once, nothing is unpickled beyond weights. Weights are converted to the
    model's dtype. strict: every model weight must be in the checkpoint and the architecture must
    match. Returns the checkpoint's `CheckpointInfo`.
    """
    path = require_megatron_checkpoint(path, "checkpoint")
    info = read_checkpoint_info(path)
    if strict:
        check_compatible(model.model_config, info.model_config, path)
    if not manifest_checked:
        verify_model_manifest(path, allow_unverified)
    # RETURN_ALL: megatron drops the requested keys the checkpoint lacks and reports both kinds of
    # mismatch; only `_extra_state` entries may differ (see _check_mismatch).
    if strict:
        state, ckpt_only, model_only = vetted_load(model.sharded_state_dict(), path, strict=StrictHandling.RETURN_ALL)
        _check_mismatch(path, {k.key if hasattr(k, "key") else k for k in ckpt_only},
                        {k.key if hasattr(k, "key") else k for k in model_only})
    else:
        state = vetted_load(model.sharded_state_dict(), path, strict=StrictHandling.LOG_ALL)
    # Transformer Engine unpickles a module's `_extra_state` (FP8 scaling history) in
    # `set_extra_state` with plain pickle; this plugin trains without FP8, so a checkpoint's extra
    # state carries nothing the model needs: it is never handed to the model (it keeps its own).
    state = {k: v for k, v in state.items() if not _is_extra_state(k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: missing weights {missing}, unexpected {unexpected}")
    return info


def _is_extra_state(key: str) -> bool:
    """Megatron names a module's extra state `<module>._extra_state` (plus a shard suffix)."""
    return "._extra_state" in key or key.startswith("_extra_state")


def _check_mismatch(path: Path, ckpt_only: set, model_only: set) -> None:
    """Allow `_extra_state` to differ; refuse any other key the checkpoint or the model lacks.

    Transformer Engine modules carry `_extra_state` (FP8 scaling metadata; TE's RMSNorm and linear
    layers each have one), torch modules do not. A checkpoint converted on CPU with the torch
    layer spec must load into the TE spec of a GPU run and back: an extra state absent from the
    checkpoint keeps the module's freshly initialised one (no FP8 history yet, which is what TE
    starts from anyway), and one the model has no slot for is ignored.
    """
    model_only = {k for k in model_only if not _is_extra_state(k)}
    ckpt_only = {k for k in ckpt_only if not _is_extra_state(k)}
    if model_only or ckpt_only:
        raise ValueError(
            f"{path}: the checkpoint lacks {sorted(model_only)[:8]} and has no slot in the model for "
            f"{sorted(ckpt_only)[:8]} (an architecture or layer-spec mismatch beyond _extra_state)"
        )


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
