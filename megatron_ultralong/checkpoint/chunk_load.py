"""Load chosen chunks of a `torch_dist` checkpoint in one process, with no collective calls.

Why not megatron-core's `TorchDistLoadShardedStrategy`: it wraps the requested ShardedTensors in
torch ShardedTensors whose metadata must cover each whole global tensor, and it places the pieces a
rank did not request on rank `(rank + 1) % world` (strategies/torch.py,
`sharded_tensor_to_torch_sharded_tensor`). In a world of one process that is the process itself, so
one process cannot load part of a stacked `decoder.layers.*` tensor (one layer of it), and every
load is a collective (local plans gathered, global plan scattered). The exporter, which streams a
checkpoint one layer at a time, needs neither: each rank knows exactly which chunk of which global
tensor it wants.

`ChunkLoadStrategy` plugs into megatron's own `dist_checkpointing.load(..., sharded_strategy=...)`,
which still applies the ShardedTensor factories (e.g. SwiGLU's [gate; up] halves) and merges them
back; only the read itself changes: torch DCP's `FileSystemReader` is asked for exactly the requested
chunks (`create_read_items_for_chunk_list`) and reads them straight into the requested tensors. The
checkpoint's `.metadata` is read once per directory, through `safe_metadata.read_dcp_metadata` (the
vetted object is what torch's reader uses: the same one read path as `vetted_load.py`; the caller
checks the manifest first, `vetted_load.verify_model_manifest`). Pass `validate_access_integrity=False` and
`strict=StrictHandling.ASSUME_OK_UNEXPECTED` to `load` so megatron adds no collective of its own;
missing tensors are errors here instead.

Scope: model weights (ShardedTensors without `flattened_range`). Requests for ShardedObjects
(`_extra_state`) or flattened optimizer shards are refused with an error naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, StateDict
from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
from torch import Tensor
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ultralong.checkpoint.safe_metadata import VettedFileSystemReader, read_dcp_metadata


class ChunkLoadStrategy(TorchDistLoadShardedStrategy):
    """megatron-core `torch_dist` load strategy that reads only the requested chunks, locally.

    Same backend name and version checks as megatron's (inherited); reusable across many `load`
    calls on the same checkpoint (the metadata is cached per directory).
    """

    def __init__(self, vetted: Optional[dict[str, Metadata]] = None) -> None:
        """vetted: directory -> the `Metadata` `read_dcp_metadata` already returned for it (the caller
        vetted it before writing anything); other directories are read and vetted on first use."""
        super().__init__()
        self._vetted = {str(Path(k).resolve()): v for k, v in (vetted or {}).items()}
        self._readers: dict[str, tuple[VettedFileSystemReader, Metadata]] = {}

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> StateDict:
        """Fill every ShardedTensor's `data` from the checkpoint; return the state dict of those
        tensors (same nesting). Rows a shape-mismatch-tolerant tensor (the padded vocabulary) has
        beyond the checkpoint's extent are set to zero."""
        reader, metadata = self._reader(checkpoint_dir)
        planner = _ChunkPlanner()
        planner.set_up_planner({}, metadata, is_coordinator=True)
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
                raise ValueError(f"{checkpoint_dir}: {getattr(sh, 'key', sh)!r} is not a plain ShardedTensor; "
                                 "ChunkLoadStrategy loads model weights only")
            if not sh.data.is_contiguous():
                sh.data = sh.data.contiguous()  # read into a compact copy; the caller copies it back
            planner.request(sh.key, tuple(sh.global_offset), sh.data.view((1,) * sh.prepend_axis_num + sh.local_shape),
                            sh.allow_shape_mismatch, checkpoint_dir)
        plan = reader.prepare_local_plan(planner.create_local_plan())
        plan = planner.finish_plan(reader.prepare_global_plan(planner.create_global_plan([plan]))[0])
        reader.read_data(plan, planner).wait()
        return dict_list_map_inplace(lambda sh: sh.data, sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Optional[Metadata] = None):
        return super().load_tensors_metadata(checkpoint_dir, self._reader(checkpoint_dir)[1])  # vetted

    def load_sharded_metadata(self, checkpoint_dir: Path):
        from megatron_ultralong.checkpoint.vetted_load import sharded_metadata

        return sharded_metadata(self, checkpoint_dir, self._reader(checkpoint_dir)[1])

    def _reader(self, checkpoint_dir: Path) -> tuple[VettedFileSystemReader, Metadata]:
        key = str(Path(checkpoint_dir).resolve())
        if key not in self._readers:
            reader = VettedFileSystemReader(key, self._vetted.get(key) or read_dcp_metadata(key))
            metadata = reader.read_metadata()
            reader.set_up_storage_reader(metadata, is_coordinator=True)
            self._readers[key] = (reader, metadata)
        return self._readers[key]


class _ChunkPlanner(LoadPlanner):
    """torch DCP LoadPlanner for explicit requests: (global tensor key, chunk offset, target tensor
    of the chunk's shape). Plans one process's reads; the global plan is its local plan."""

    def __init__(self) -> None:
        self.targets: dict[tuple[str, tuple[int, ...]], Tensor] = {}
        self.metadata: Optional[Metadata] = None

    def set_up_planner(self, state_dict: Any, metadata: Optional[Metadata] = None, is_coordinator: bool = True,
                       **kwargs: Any) -> None:
        self.metadata = metadata

    def request(self, key: str, offsets: tuple[int, ...], target: Tensor, allow_shape_mismatch: bool,
                source: Any) -> None:
        """Ask for the chunk of global tensor `key` at `offsets` with `target`'s shape, read into
        `target`. Where the chunk reaches past the stored tensor (allowed only when
        allow_shape_mismatch, i.e. extra vocab padding rows), the target is zeroed first."""
        stored = self.metadata.state_dict_metadata.get(key)
        if not isinstance(stored, TensorStorageMetadata):
            raise ValueError(f"{source}: the checkpoint holds no tensor {key!r}")
        if len(offsets) != len(stored.size):
            raise ValueError(f"{source}: {key!r} is stored with {len(stored.size)} dims, requested with {len(offsets)}")
        if any(o + s > g for o, s, g in zip(offsets, target.shape, stored.size)):
            if not allow_shape_mismatch:
                raise ValueError(f"{source}: {key!r} chunk at {offsets} of size {tuple(target.shape)} lies "
                                 f"outside the stored tensor of shape {tuple(stored.size)}")
            target.zero_()
        if (key, offsets) in self.targets:
            raise ValueError(f"{source}: {key!r} chunk at {offsets} requested twice")
        self.targets[(key, offsets)] = target

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), target in self.targets.items():
            chunk = ChunkStorageMetadata(torch.Size(offsets), target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def resolve_tensor(self, read_item: ReadItem) -> Tensor:
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            if length < target.shape[dim]:
                target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: Tensor) -> None:
        pass  # resolve_tensor handed out a view of the target, which the reader copied into

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise ValueError(f"unexpected object {read_item.dest_index.fqn!r}: only tensors are requested")
