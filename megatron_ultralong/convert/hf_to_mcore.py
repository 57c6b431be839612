"""HF Llama (safetensors) -> Megatron-Core `torch_dist` checkpoint, at any TP/PP.

Every rank builds its own model stage (its PP layers, its TP shard) without random init and without
ever filling it: the stage gives megatron-core's `dist_checkpointing` its keys, shapes and sharding
(`checkpoint.save_megatron_checkpoint`), and `HFStageSource` hands the writer each parameter's data
when it is about to be written, built from the HF shards' memory maps (`model_weights.hf_param_data`:
fuse, pad vocab, slice for TP) and freed once written. Resident weights stay about one parameter
(twice the largest tensor at peak), whatever the model's size. The result is TP/PP-agnostic: the
TP/PP used here only splits the work across processes.

Context extension happens here in the UltraLong recipe: `context` (e.g.
`ContextExtension(1 << 20, beta_fast=4)`) replaces the HF RoPE through `model.config.extend_context`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from megatron_ultralong.checkpoint.torch_dist import load_megatron_checkpoint, save_megatron_checkpoint
from megatron_ultralong.convert.heap import release_freed_memory
from megatron_ultralong.convert.hf_io import HFCheckpointReader
from megatron_ultralong.dtypes import DTYPES, dtype_name
from megatron_ultralong.convert.key_map import OUTPUT, expected_hf_shapes, hf_names, hf_tensors, tied_output
from megatron_ultralong.convert.model_weights import hf_param_data, load_hf_weights, stage_hf_names, stage_params
from megatron_ultralong.model.config import ContextExtension, LlamaConfig, check_parallel_fits
from megatron_ultralong.model.gpt import DEFAULT_VOCAB_DIVISIBLE_BY, UltraLongGPTModel, build_model
from megatron_ultralong.convert.verify import VerifyReport, verify_against_hf
from megatron_ultralong.parallel.runtime import Runtime

# Tensors old HF checkpoints carry that are derived, not learned (recomputed from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf(
    hf_config: dict,
    source: str = "config.json",
    context: Optional[ContextExtension] = None,
) -> LlamaConfig:
    """The plugin's config for an HF config.json, optionally extended (`extend_context`)."""
    try:
        cfg = LlamaConfig.from_hf(hf_config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    return cfg if context is None else context.apply(cfg)


def check_hf_weights(reader: HFCheckpointReader, cfg: LlamaConfig) -> None:
    """Config and weights must agree before anything is built: every tensor present with its
    shape, nothing unaccounted for (a bias, an extra layer). Errors name the tensor and file."""
    expected = expected_hf_shapes(cfg)
    present = set(reader.names())
    missing = [n for n in expected if n not in present]
    if missing:
        raise ValueError(
            f"{reader.path}: {len(missing)} tensor(s) the config needs are missing, first {missing[0]!r}"
        )
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ValueError(
                f"{reader.path / reader.weight_map[name]}: tensor {name!r} has shape "
                f"{reader.shape(name)}, config.json implies {shape}"
            )
    extra = sorted(n for n in present - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
    (lm_head,) = hf_names(OUTPUT, None)
    if tied_output(OUTPUT, cfg) and lm_head in extra:
        # Some tied checkpoints store the shared matrix twice; accept only an identical copy.
        (embedding,) = hf_tensors(OUTPUT, None, cfg)
        if not torch.equal(reader.get(lm_head), reader.get(embedding)):
            raise ValueError(
                f"{reader.path}: config.json has tie_word_embeddings=true but {lm_head} differs from {embedding}"
            )
        extra.remove(lm_head)
    if extra:
        raise ValueError(
            f"{reader.path}: {len(extra)} tensor(s) not part of a Llama with this config.json "
            f"(num_hidden_layers={cfg.num_layers}, tie_word_embeddings={cfg.tie_word_embeddings}), "
            f"first {extra[0]!r} in {reader.weight_map[extra[0]]}"
        )


def hf_checkpoint_dtype(reader: HFCheckpointReader) -> torch.dtype:
    """The dtype the HF checkpoint stores (config's torch_dtype, else its embedding's dtype)."""
    name = reader.config.get("torch_dtype") or reader.config.get("dtype")
    return DTYPES.get(name, reader.dtype("model.embed_tokens.weight"))


def build_stage(cfg: LlamaConfig, runtime: Runtime, dtype: torch.dtype,
                vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY) -> UltraLongGPTModel:
    """This rank's model stage with uninitialised weights (they are overwritten by a load;
    skipping Megatron's random init saves minutes at 8B on CPU)."""
    return build_model(cfg, runtime, params_dtype=dtype, vocab_divisible_by=vocab_divisible_by,
                       pipeline_dtype=dtype, perform_initialization=False)


def load_hf_into_model(
    model: UltraLongGPTModel, reader: HFCheckpointReader, cfg: LlamaConfig, runtime: Runtime,
    progress: bool = True,
) -> None:
    """Stream the HF tensors this stage needs into it (tqdm on global rank 0)."""
    bar = tqdm(total=len(stage_hf_names(model, cfg)), desc="hf -> megatron", unit="tensor",
               disable=not progress or runtime.rank != 0)

    def get(name: str) -> Tensor:
        bar.update(1)
        return reader.get(name)

    load_hf_weights(model, cfg, get, runtime.pg_collection.tp)
    bar.close()


class HFStageSource:
    """The `materialize` hook of `save_megatron_checkpoint` for an unfilled stage: given a model
    parameter (or a view of one: megatron saves SwiGLU's fc1 as its [gate; up] halves), returns the
    same view of that parameter's data built from the HF checkpoint.

    The last parameter built is kept until another one is asked for, so the views of one
    parameter, which the writer asks for one after the other, build it once.
    """

    def __init__(self, model: UltraLongGPTModel, reader: HFCheckpointReader, cfg: LlamaConfig,
                 runtime: Runtime, progress: bool = True):
        self._params = {p.untyped_storage().data_ptr(): (name, p, rule, layer)
                        for name, p, rule, layer in stage_params(model)}
        self._reader, self._cfg = reader, cfg
        tp = runtime.pg_collection.tp
        self._tp_rank, self._tp_size = dist.get_rank(tp), dist.get_world_size(tp)
        self._last: Optional[tuple[int, Tensor]] = None
        self._bar = tqdm(total=len(self._params), desc="hf -> megatron", unit="param",
                         disable=not progress or runtime.rank != 0)

    def __call__(self, view: Tensor) -> Tensor:
        ptr = view.untyped_storage().data_ptr()
        if ptr not in self._params:
            raise RuntimeError(f"asked to write a tensor that is no parameter of this stage (shape {tuple(view.shape)})")
        name, param, rule, layer = self._params[ptr]
        if self._last is None or self._last[0] != ptr:
            self._last = None  # drop the previous parameter (freed once the writer is done with it)
            release_freed_memory()
            data = hf_param_data(name, param, rule, layer, self._cfg, self._reader.get, self._tp_rank, self._tp_size)
            self._last = (ptr, data)
            self._bar.update(1)
        return self._last[1].as_strided(view.shape, view.stride(), view.storage_offset() - param.storage_offset())

    def close(self) -> None:
        self._last = None
        self._bar.close()


def convert_hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    runtime: Runtime,
    *,
    dtype: Optional[torch.dtype] = None,
    context: Optional[ContextExtension] = None,
    vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
) -> tuple[Path, Optional[VerifyReport]]:
    """Convert an HF Llama directory into a Megatron `torch_dist` checkpoint (collective).

    dtype: weights' dtype in the checkpoint (default: the HF checkpoint's). context: extends the
    context at import (`extend_context`: YaRN RoPE, max_position_embeddings). verify: load the written checkpoint back (megatron's
    loader, the whole stage in memory) and compare it with transformers on a short prompt (report
    on rank 0; when extended the reference runs with the new RoPE too). Tokenizer / generation files are
    carried in `<out>/hf_files/`. Returns (checkpoint path, report or None).
    """
    reader = HFCheckpointReader(hf_dir)
    cfg = model_config_from_hf(reader.config, str(reader.path / "config.json"), context)
    check_hf_weights(reader, cfg)
    check_parallel_fits(cfg, runtime.parallel.tensor_parallel, runtime.parallel.pipeline_parallel, "--tp ", "--pp ")
    dtype = dtype or hf_checkpoint_dtype(reader)
    model = build_stage(cfg, runtime, dtype, vocab_divisible_by)
    source = HFStageSource(model, reader, cfg, runtime, progress)
    extra = {"converted_from": str(Path(hf_dir).resolve()), "source_dtype": dtype_name(hf_checkpoint_dtype(reader))}
    try:
        path = save_megatron_checkpoint(model, out_dir, vocab_divisible_by=vocab_divisible_by, extra=extra,
                                        side_files=reader.side_files(), overwrite=overwrite, materialize=source)
    finally:
        source.close()
    report = None
    if verify:  # what was written, read back through megatron's loader, against transformers
        load_megatron_checkpoint(model, path, manifest_checked=True)  # just written, manifest included
        # The reference runs with the config the conversion used (its RoPE replaced, or parsed from a
        # transformers 5 `rope_parameters` config.json that transformers 4.x would misread).
        report = verify_against_hf(model, runtime, reader.path, hf_config=cfg.to_hf(dtype_name(dtype)))
    return path, report
