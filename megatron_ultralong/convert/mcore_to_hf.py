"""Megatron-Core `torch_dist` checkpoint -> HF Llama directory (safetensors shards, config.json with
the model's RoPE, tokenizer files), at any TP/PP.

Each rank builds its stage without touching its memory and loads (and reshards) the checkpoint into
it one transformer layer at a time through megatron-core's `dist_checkpointing.load` with a local,
collective-free read (`chunk_load.ChunkLoadStrategy`), so one process suffices; then
`model_weights.export_hf_weights` gathers every weight over TP, splits fused tensors back into HF's
q/k/v and gate/up and truncates the vocab padding, and the layer is freed. One writer per PP stage
(TP, DP and CP rank 0) writes its tensors straight into planned safetensors shards
(`hf_shards.HFShardWriter`); global rank 0 numbers the shards in stage order and writes the index.
The exported `config.json` carries the RoPE the model was trained with (e.g. yarn after context
extension); converters that map only some rope_scaling types silently diverge from HF
(https://github.com/NVIDIA-NeMo/Megatron-Bridge/pull/5097).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.metadata import Metadata
from tqdm import tqdm

from megatron_ultralong.checkpoint.chunk_load import ChunkLoadStrategy
from megatron_ultralong.checkpoint.info import read_checkpoint_info
from megatron_ultralong.checkpoint.paths import require_megatron_checkpoint
from megatron_ultralong.checkpoint.torch_dist import (
    SIDE_DIR,
    begin_atomic_dir,
    check_compatible,
    finish_atomic_dir,
    load_megatron_checkpoint,
)
from megatron_ultralong.checkpoint.safe_metadata import read_dcp_metadata
from megatron_ultralong.checkpoint.vetted_load import WeightsOnlyCommonStrategy, verify_model_manifest
from megatron_ultralong.convert.heap import release_freed_memory
from megatron_ultralong.convert.hf_io import write_hf_config
from megatron_ultralong.dtypes import dtype_name
from megatron_ultralong.convert.hf_shards import HFShardWriter, finish_hf_shards
from megatron_ultralong.convert.hf_to_mcore import build_stage
from megatron_ultralong.convert.key_map import expected_hf_shapes
from megatron_ultralong.convert.model_weights import export_hf_weights, stage_hf_names, stage_params
from megatron_ultralong.model.config import ContextExtension, LlamaConfig, check_parallel_fits
from megatron_ultralong.model.gpt import UltraLongGPTModel
from megatron_ultralong.convert.verify import VerifyReport, verify_against_hf
from megatron_ultralong.parallel.runtime import Runtime


def is_replica(runtime: Runtime) -> bool:
    """DP / CP replicas hold the same weights as their DP/CP rank 0, which exports them."""
    pgs = runtime.pg_collection
    return not all(g is None or g.rank() == 0 for g in (getattr(pgs, "dp", None), getattr(pgs, "cp", None)))


def param_groups(model: UltraLongGPTModel) -> list[list[str]]:
    """This stage's weight names (no `_extra_state`) in model order, grouped into the units
    `write_hf_stage` loads, exports and frees at a time: what comes before the transformer layers
    (the embedding), each layer, and what comes after them (final norm, output layer)."""
    groups: list[list[str]] = []
    current, seen_layer = None, False
    for name, _, _, _ in stage_params(model):
        m = re.match(r"decoder\.layers\.(\d+)\.", name)
        seen_layer = seen_layer or m is not None
        key = m.group(1) if m else ("after" if seen_layer else "before")
        if key != current:
            groups.append([])
            current = key
        groups[-1].append(name)
    return groups


def write_hf_stage(
    model: UltraLongGPTModel,
    cfg: LlamaConfig,
    runtime: Runtime,
    checkpoint: Path,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_size: Union[int, str],
    progress: bool = True,
    vetted: Optional[Metadata] = None,
) -> tuple[list[tuple[str, list[str]]], int]:
    """Load this stage from `checkpoint` one layer at a time, write it into temporary shards in
    out_dir and free each layer once written (collective over the TP group only: TP ranks gather).

    The model must come from `build_stage` (uninitialised weights are never touched, so they take
    no resident memory): resident weights stay about one layer. Reads go through
    `ChunkLoadStrategy` (this rank's chunks only, no collective), writes through `HFShardWriter`
    (straight to disk, nothing buffered). The model's weights are released afterwards. Returns
    (shards, bytes) written by this rank; empty except on TP rank 0 of DP/CP rank 0. vetted: the
    checkpoint's `.metadata` as `read_dcp_metadata` returned it (read here when None)."""
    if is_replica(runtime):
        return [], 0
    tp = runtime.pg_collection.tp
    pp_rank = runtime.pg_collection.pp.rank()
    shapes = expected_hf_shapes(cfg)
    names = stage_hf_names(model, cfg, export=True)
    writer = HFShardWriter(out_dir, [(n, dtype, shapes[n]) for n in names], max_shard_size,
                           prefix=f"pp{pp_rank:04d}-") if tp.rank() == 0 else None
    bar = tqdm(total=len(names), desc=f"megatron -> hf (stage {pp_rank})", unit="tensor",
               disable=not progress or writer is None)
    strategy = ChunkLoadStrategy({str(checkpoint): vetted} if vetted is not None else None)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for group in param_groups(model):
            # megatron's load (factories applied and merged back) of just these keys, read locally.
            sharded = {k: v for k, v in model.sharded_state_dict().items() if k in group}
            state = dist_checkpointing.load(sharded, str(checkpoint), sharded_strategy=strategy,
                                            common_strategy=WeightsOnlyCommonStrategy(),
                                            validate_access_integrity=False,
                                            strict=StrictHandling.ASSUME_OK_UNEXPECTED)
            del sharded
            model.load_state_dict(state, strict=False)
            del state
            for name, tensor in export_hf_weights(model, cfg, tp, dtype, only=group):
                if writer is not None:
                    writer.add(name, tensor)
                bar.update(1)
                del tensor
            for name in group:
                params[name].detach().untyped_storage().resize_(0)  # written: free the layer
            release_freed_memory()
    bar.close()
    if writer is None:
        return [], 0
    writer.close()
    return writer.shards, writer.total_bytes


def convert_mcore_to_hf(
    mcore_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    runtime: Runtime,
    *,
    dtype: Optional[torch.dtype] = None,
    context: Optional[ContextExtension] = None,
    max_shard_size: Union[int, str] = "1GB",
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
    allow_unverified: bool = False,
    manifest_checked: bool = False,
) -> tuple[Path, Optional[VerifyReport]]:
    """Convert a checkpoint written by `save_megatron_checkpoint` into an HF directory (collective).

    mcore_dir: a model, iter_* or save directory (checkpoint/paths.py). Its manifest is checked
    before anything is written (checkpoint/vetted_load.py; allow_unverified skips that on request,
    manifest_checked says the caller did it), so a refused export leaves no output directory.

    dtype: exported dtype (default: the checkpoint's). context: extends the context
    written to config.json (`extend_context`; default: the checkpoint's own RoPE). verify: after the export, run the loaded model and
    transformers on the exported directory (its own config.json), both in the exported dtype, and
    report on rank 0.
    Returns (output path, report or None).
    """
    mcore_dir, out_dir = require_megatron_checkpoint(mcore_dir, "MCORE_DIR"), Path(out_dir)
    if not manifest_checked:
        verify_model_manifest(mcore_dir, allow_unverified)
    vetted = read_dcp_metadata(mcore_dir)  # refused here, before the output exists; read once
    info = read_checkpoint_info(mcore_dir)
    cfg = info.model_config if context is None else context.apply(info.model_config)
    check_parallel_fits(cfg, runtime.parallel.tensor_parallel, runtime.parallel.pipeline_parallel, "--tp ", "--pp ")
    check_compatible(cfg, info.model_config, mcore_dir)
    model = build_stage(cfg, runtime, info.torch_dtype, info.vocab_divisible_by)
    out_dtype = dtype or info.torch_dtype
    tmp = begin_atomic_dir(out_dir, overwrite)
    try:
        shards, nbytes = write_hf_stage(model, cfg, runtime, mcore_dir, tmp, out_dtype, max_shard_size, progress,
                                        vetted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    del model
    gathered: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    record = (runtime.pg_collection.pp.rank(), shards, nbytes)
    if dist.is_initialized():
        dist.all_gather_object(gathered, record)
    else:
        gathered = [record]
    if runtime.rank == 0:
        ordered = sorted((r for r in gathered if r[1]), key=lambda r: r[0])
        stage_shards = [s for _, shard_list, _ in ordered for s in shard_list]
        finish_hf_shards(tmp, stage_shards, sum(r[2] for r in ordered))
        write_hf_config(tmp, cfg.to_hf(torch_dtype=dtype_name(out_dtype)))
        side = mcore_dir / SIDE_DIR
        if side.is_dir():
            for f in sorted(side.iterdir()):
                shutil.copy2(f, tmp / f.name)
    finish_atomic_dir(tmp, out_dir)
    report = None
    if verify:
        # The export freed the weights: load the whole stage again, in the exported dtype (the
        # loader converts), so that both sides compute in the precision the HF directory holds and
        # the default tolerance is that dtype's: an fp32 checkpoint exported to bf16 differs from
        # its own fp32 logits by bf16 rounding, which is the export doing its job, not an error.
        model = build_stage(cfg, runtime, out_dtype, info.vocab_divisible_by)
        load_megatron_checkpoint(model, mcore_dir, manifest_checked=True)
        report = verify_against_hf(model, runtime, out_dir)
    return out_dir, report
