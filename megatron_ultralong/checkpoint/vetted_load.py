"""The one read path for a `torch_dist` model checkpoint: conversion, evaluation, start-from and resume.

Loading a checkpoint must never run code from it, nor read outside it, nor load a file its
manifest says is damaged:

1. `checkpoint/paths.py` resolves the path the user gave (save dir -> `latest` -> iter -> model/),
   refusing a pointer or a link that leads out of the checkpoint.
2. `verify_model_manifest` recomputes the CRC-32 of every file of the model directory listed in
   the manifest (`model/manifest.json` for a converted model, `iter_*/manifest.json` for a training
   checkpoint) and refuses a file that differs, is missing, or is not listed. The caller may waive
   the check explicitly (`--no-verify-manifest`, `allow_unverified=True`).
3. `.metadata` (a pickle) is read once through `safe_metadata.read_dcp_metadata`, and that vetted
   object is what torch's reader uses (`VettedLoadStrategy`).
4. Pickled byte entries inside `.distcp` files (megatron's ShardedObjects) and `common.pt` load
   with `torch.load(weights_only=True)`: torch's DCP planner would call `torch.load(...,
   weights_only=False)` on them (torch/distributed/checkpoint/default_planner.py, `load_bytes`).

Why a subclass of megatron-core's `TorchDistLoadShardedStrategy` that repeats its `load`: megatron
builds its `FileSystemReader` inside `load` (strategies/torch.py, `_get_filesystem_reader`) with no
way to hand it metadata that was already read, so the ten lines that build and run the read are
repeated here with the vetted reader and planner; the translation helpers are megatron's own.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, StateDict
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata

from megatron_ultralong.checkpoint.manifest import MANIFEST, CheckpointCorruptError, verify_manifest
from megatron_ultralong.checkpoint.paths import MODEL_SUBDIR
from megatron_ultralong.checkpoint.safe_metadata import VettedFileSystemReader, read_dcp_metadata

logger = logging.getLogger(__name__)

NO_VERIFY_HINT = "--no-verify-manifest / allow_unverified=True loads it anyway"


def manifest_scope(model_dir: Path) -> Optional[tuple[Path, str]]:
    """(directory holding the manifest, prefix of the model's entries in it), or None without one."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        return model_dir, ""
    if model_dir.name == MODEL_SUBDIR and (model_dir.parent / MANIFEST).is_file():
        return model_dir.parent, f"{MODEL_SUBDIR}/"
    return None


def verify_model_manifest(model_dir: str | os.PathLike, allow_unverified: bool = False) -> bool:
    """Collective: check every file of `model_dir` against its manifest before anything is read.
    Returns True when a manifest was checked, False when there is none (a warning says so) or the
    check was waived. CheckpointCorruptError names the first bad file."""
    model_dir = Path(model_dir)
    scope = manifest_scope(model_dir)
    if scope is None:
        logger.warning("%s has no %s: loading it without a checksum check", model_dir, MANIFEST)
        return False
    if allow_unverified:
        logger.warning("%s: checksum manifest NOT checked (asked for explicitly)", model_dir)
        return False
    root, prefix = scope
    problem = verify_manifest(root, only=prefix)
    if problem is not None:
        raise CheckpointCorruptError(f"{problem}; refusing to load {model_dir} ({NO_VERIFY_HINT})")
    return True


class _WeightsOnlyLoadPlanner(MCoreLoadPlanner):
    """megatron's load planner; pickled byte entries load with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class WeightsOnlyCommonStrategy(TorchCommonLoadStrategy):
    """megatron's common-state strategy with weights_only=True said explicitly (torch's default since
    2.6, but an environment variable, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, can turn that default off)."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise CheckpointCorruptError(f"{path} is missing: not a complete torch_dist checkpoint")
        return torch.load(path, map_location="cpu", weights_only=True)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise CheckpointCorruptError(f"{checkpoint_dir}: sharded objects in separate files are not read "
                                     "(this plugin's checkpoints keep them inside the .distcp files)")


class VettedLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core's `torch_dist` load strategy reading through a vetted `.metadata` (read once)."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metadata: Metadata = read_dcp_metadata(self.checkpoint_dir)

    def _reader(self, checkpoint_dir) -> VettedFileSystemReader:
        if Path(checkpoint_dir).resolve() != self.checkpoint_dir.resolve():
            raise ValueError(f"strategy vetted {self.checkpoint_dir}, asked to read {checkpoint_dir}")
        return VettedFileSystemReader(self.checkpoint_dir, self.metadata)

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> StateDict:
        # megatron-core 0.16.1 strategies/torch.py `TorchDistLoadShardedStrategy.load`, with the
        # vetted reader and the weights-only planner (module doc).
        flexible = [t for t in nested_values(sharded_state_dict)
                    if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch]
        mismatch_ok = {t.key: t for t in nested_values(sharded_state_dict)
                       if isinstance(t, ShardedTensor) and t.allow_shape_mismatch}
        orig = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, True)
        dcp.load_state_dict(pyt_state_dict, self._reader(checkpoint_dir), planner=_WeightsOnlyLoadPlanner(
            shapes_validation_sharded_tensors=flexible, allow_shape_mismatch_sharded_tensors=mismatch_ok))
        self.cached_global_metadata = self.metadata
        state = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        state = _replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
        _restore_dict_types(state, orig)
        return state

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Optional[Metadata] = None):
        self._reader(checkpoint_dir)  # same directory check
        return super().load_tensors_metadata(checkpoint_dir, self.metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path) -> ShardedStateDict:
        self._reader(checkpoint_dir)  # same directory check
        return sharded_metadata(self, checkpoint_dir, self.metadata)


def sharded_metadata(strategy: TorchDistLoadShardedStrategy, checkpoint_dir: Path,
                     metadata: Metadata) -> ShardedStateDict:
    """megatron-core's `TorchDistLoadShardedStrategy.load_sharded_metadata` on a vetted `metadata`
    (megatron's own reads `.metadata` again through a plain reader)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            obj = ShardedObject.empty_from_unique_key(key)
            out[obj.unique_key] = obj
    out.update(TorchDistLoadShardedStrategy.load_tensors_metadata(strategy, checkpoint_dir, metadata))
    return out


def vetted_load(sharded_state_dict: ShardedStateDict, checkpoint_dir: str | os.PathLike, **kwargs: Any):
    """megatron-core's `dist_checkpointing.load` through `VettedLoadStrategy` and the weights-only
    common strategy (same arguments and return value). Does not check the manifest: callers do
    (`verify_model_manifest`, or resume's whole-iteration check) before calling it."""
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir),
                                   sharded_strategy=VettedLoadStrategy(checkpoint_dir),
                                   common_strategy=WeightsOnlyCommonStrategy(), **kwargs)
