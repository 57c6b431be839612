"""Megatron-Core `torch_dist` checkpoint -> HF Llama directory (safetensors shards, config.json with
the model's RoPE, tokenizer files), at any TP/PP.

Each rank builds its stage without touching its memory, megatron-core loads (and reshards) the
checkpoint into it one transformer layer at a time, and `model_weights.export_hf_weights` gathers every weight over TP, splits fused tensors back into HF's
q/k/v and gate/up and truncates the vocab padding. One writer per PP stage (TP, DP and CP rank 0)
streams its tensors into bounded shards; global rank 0 numbers the shards in stage order and writes
the index. The exported `config.json` carries the RoPE the model was trained with (e.g. yarn after
context extension), which is the failure MEGATRON.md §5 #11 reports for other converters.
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
from tqdm import tqdm

from megatron_ultralong.convert.checkpoint import (
    SIDE_DIR,
    begin_atomic_dir,
    check_compatible,
    finish_atomic_dir,
    load_megatron_checkpoint,
    read_checkpoint_info,
)
from megatron_ultralong.convert.hf_io import HFCheckpointWriter, dtype_name, finish_hf_shards, write_hf_config
from megatron_ultralong.convert.hf_to_mcore import build_stage, check_parallel_fits, with_rope
from megatron_ultralong.convert.model_weights import export_hf_weights, stage_hf_names
from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.model.gpt import UltraLongGPTModel
from megatron_ultralong.rope import RopeConfig
from megatron_ultralong.convert.verify import VerifyReport, verify_against_hf
from megatron_ultralong.runtime import Runtime


def is_stage_writer(runtime: Runtime) -> bool:
    """The one rank per PP stage that writes its tensors: TP, CP and DP rank 0."""
    pgs = runtime.pg_collection
    return all(g is None or g.rank() == 0 for g in (pgs.tp, getattr(pgs, "cp", None), getattr(pgs, "dp", None)))


def param_groups(model: UltraLongGPTModel) -> list[list[str]]:
    """This stage's state-dict names, one group per transformer layer, in model order: the unit
    `write_hf_stage` loads, exports and frees at a time. The embedding joins the first layer's
    group and the final norm / output layer the last one's, so every PP stage has the same number
    of groups (megatron's load is collective over all ranks: the calls must line up)."""
    layers: dict[str, list[str]] = {}
    before, after = [], []
    for name in model.state_dict():
        m = re.match(r"decoder\.layers\.(\d+)\.", name)
        if m:
            layers.setdefault(m.group(1), []).append(name)
        else:
            (after if layers else before).append(name)
    groups = list(layers.values()) or [[]]
    groups[0] = before + groups[0]
    groups[-1] = groups[-1] + after
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
) -> tuple[list[tuple[str, list[str]]], int]:
    """Load this stage from `checkpoint` one layer at a time, export it into temporary shards in
    out_dir and free each layer after export (collective over the default group).

    The model must come from `build_stage` (uninitialised weights are never touched, so they take
    no resident memory): resident weights stay ~one layer plus the shard buffer. The model's
    weights are released afterwards. Returns (shards, bytes) written by this rank; empty on
    non-writer ranks."""
    writer_rank = is_stage_writer(runtime)
    pp_rank = runtime.pg_collection.pp.rank()
    writer = HFCheckpointWriter(out_dir, max_shard_size, prefix=f"pp{pp_rank:04d}-")
    n = len(stage_hf_names(model, cfg, export=True))
    bar = tqdm(total=n, desc=f"megatron -> hf (stage {pp_rank})", unit="tensor",
               disable=not progress or not writer_rank)
    params = model.state_dict(keep_vars=True)
    # megatron-core marks the shards a rank does not request as living on "rank + 1 mod world"
    # (strategies/torch.py `sharded_tensor_to_torch_sharded_tensor`), which needs a world of >= 2
    # to load part of a stacked `decoder.layers.*` tensor. In a 1-process world the stage is loaded
    # whole instead (resident memory = the model); `mu-convert` therefore runs >= 2 processes.
    streaming = dist.is_initialized() and dist.get_world_size() > 1
    # DP / CP replicas hold the same weights as their DP/CP rank 0: they take part in the collective
    # loads with nothing requested (the condition is uniform within a TP group, so export's TP
    # gathers still line up).
    replica = not all(g is None or g.rank() == 0 for g in (getattr(runtime.pg_collection, "dp", None),
                                                           getattr(runtime.pg_collection, "cp", None)))
    groups = param_groups(model) if streaming else [list(params)]
    pending: list[torch.Tensor] = []
    with torch.no_grad():
        for group in groups:
            # Megatron loads (and reshards) just these keys; the rest of the checkpoint is not read.
            # A piece loads part of each stacked `decoder.layers.*` tensor by design: skip the
            # whole-tensor access check (load_megatron_checkpoint keeps it).
            wanted = () if replica else group
            sharded = {k: v for k, v in model.sharded_state_dict().items() if k in wanted}
            state = dist_checkpointing.load(sharded, str(checkpoint), validate_access_integrity=not streaming,
                                            strict=StrictHandling.ASSUME_OK_UNEXPECTED)
            del sharded
            if replica:
                continue
            model.load_state_dict(state, strict=False)
            del state
            for name, tensor in export_hf_weights(model, cfg, runtime.pg_collection.tp, dtype, only=group):
                if writer_rank:
                    writer.add(name, tensor)
                bar.update(1)
            pending.extend(params[n] for n in group if isinstance(params[n], torch.Tensor))  # not `_extra_state`
            # Free the layer's weights, except those the writer still buffers as views (norms and
            # TP=1 linears are exported as is): they go once their shard is written.
            buffered = writer.buffered_storages()
            for p in [p for p in pending if p.untyped_storage().data_ptr() not in buffered]:
                p.detach().untyped_storage().resize_(0)
            pending = [p for p in pending if p.untyped_storage().data_ptr() in buffered]
    if writer_rank:
        writer.flush()
    bar.close()
    return writer.shards, writer.total_bytes


def convert_mcore_to_hf(
    mcore_dir: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    runtime: Runtime,
    *,
    dtype: Optional[torch.dtype] = None,
    rope: Optional[RopeConfig] = None,
    max_shard_size: Union[int, str] = "1GB",
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
) -> tuple[Path, Optional[VerifyReport]]:
    """Convert a checkpoint written by `save_megatron_checkpoint` into an HF directory (collective).

    dtype: exported dtype (default: the checkpoint's). rope: overrides the RoPE written to
    config.json (default: the checkpoint's own). verify: after the export, run the loaded model and
    transformers on the exported directory (its own config.json) and report on rank 0.
    Returns (output path, report or None).
    """
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    info = read_checkpoint_info(mcore_dir)
    cfg = with_rope(info.model_config, rope)
    check_parallel_fits(cfg, runtime.parallel.tensor_parallel, runtime.parallel.pipeline_parallel)
    check_compatible(cfg, info.model_config, mcore_dir)
    model = build_stage(cfg, runtime, info.torch_dtype, info.vocab_divisible_by)
    out_dtype = dtype or info.torch_dtype
    tmp = begin_atomic_dir(out_dir, overwrite)
    shards, nbytes = write_hf_stage(model, cfg, runtime, mcore_dir, tmp, out_dtype, max_shard_size, progress)
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
    if verify:  # the export freed the weights: load the whole stage again
        model = build_stage(cfg, runtime, info.torch_dtype, info.vocab_divisible_by)
        load_megatron_checkpoint(model, mcore_dir)
        report = verify_against_hf(model, runtime, out_dir)
    return out_dir, report
