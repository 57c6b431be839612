"""Move weights between an HF Llama state (name -> tensor) and a built `UltraLongGPTModel` stage.

Driven by the model: every parameter of this rank's stage and TP shard is looked up in the key map
and assembled from the HF tensor(s) it is made of, sharded for this TP rank (`hf_param_data`), then
copied in (`load_hf_weights`) or handed straight to a checkpoint writer (hf-to-mcore). One tensor at
a time, so a caller that fetches HF tensors lazily (safetensors memory maps) streams.
"""
from __future__ import annotations

from typing import Callable, Container, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_ultralong.convert.key_map import (
    KeyRule,
    fuse_fc1,
    fuse_qkv,
    hf_names,
    hf_tensors,
    pad_vocab,
    rule_for_megatron_name,
    shard_tp,
    split_fc1,
    split_qkv,
    tied_output,
    unshard_tp,
)
from megatron_ultralong.model.config import LlamaConfig


def stage_params(model: nn.Module) -> Iterator[tuple[str, Tensor, KeyRule, Optional[int]]]:
    """(local name, parameter, rule, global layer index) for every weight of this stage."""
    local_to_global = {
        j: layer.layer_number - 1 for j, layer in enumerate(getattr(model.decoder, "layers", []))
    }
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        rule, local_layer = rule_for_megatron_name(name)
        layer = None if local_layer is None else local_to_global[local_layer]
        yield name, tensor, rule, layer


def stage_hf_names(model: nn.Module, cfg: LlamaConfig, export: bool = False) -> list[str]:
    """The HF tensor names this rank's stage is made of: what `load_hf_weights` reads, or with
    export=True what `export_hf_weights` yields (a tied output layer is not exported)."""
    names = []
    for _, _, rule, layer in stage_params(model):
        names.extend(hf_tensors(rule, layer, cfg, export))
    return names


def hf_param_data(
    name: str,
    param: Tensor,
    rule: KeyRule,
    layer: Optional[int],
    cfg: LlamaConfig,
    get_hf_tensor: Callable[[str], Tensor],
    tp_rank: int = 0,
    tp_size: int = 1,
) -> Tensor:
    """This TP rank's data for the Megatron parameter `name` (shape and dtype of `param`, which is
    only looked at), assembled from the HF tensor(s) it is made of: fused, vocab-padded, TP-sliced.

    Returns a contiguous tensor that owns its storage. Each HF tensor is cast to the parameter's
    dtype as it arrives (fusing and padding are copies, so the result is bit-identical to casting
    at the end), and intermediates are dropped early: about twice the parameter's bytes at peak.
    """
    sources = hf_tensors(rule, layer, cfg)
    try:
        tensors = [get_hf_tensor(n).to(param.dtype) for n in sources]
    except KeyError as e:
        raise ValueError(f"HF checkpoint is missing {e.args[0]!r} (needed for {name})") from None
    if rule.kind == "qkv":
        full = fuse_qkv(*tensors, cfg)
    elif rule.kind == "fc1":
        full = fuse_fc1(*tensors, cfg)
    elif rule.kind == "vocab":
        (full,) = tensors
        if tuple(full.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(
                f"{sources[0]}: shape {tuple(full.shape)} does not match the config's "
                f"({cfg.vocab_size}, {cfg.hidden_size})"
            )
        full = pad_vocab(full, param.shape[0] * tp_size)
    else:
        (full,) = tensors
    del tensors
    local = shard_tp(rule.kind, full, tp_rank, tp_size)
    if local.shape != param.shape:
        raise ValueError(
            f"{name}: HF tensor(s) {sources} give shape {tuple(local.shape)} on TP rank "
            f"{tp_rank}, the model expects {tuple(param.shape)}"
        )
    if local.untyped_storage().nbytes() != local.numel() * local.element_size():
        # A TP slice is a view into `full`: copy it out so the rest of `full` is freed now.
        local = local.clone(memory_format=torch.contiguous_format)
    return local


def load_hf_weights(
    model: nn.Module,
    cfg: LlamaConfig,
    get_hf_tensor: Callable[[str], Tensor],
    tp_group: Optional[dist.ProcessGroup] = None,
) -> list[str]:
    """Copy HF weights into this rank's model stage; returns the HF names it read.

    get_hf_tensor(name) returns the HF tensor (raises KeyError if absent). Shapes are checked
    against the config, and every model weight must be covered.
    """
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    read: list[str] = []
    with torch.no_grad():
        for name, param, rule, layer in stage_params(model):
            param.copy_(hf_param_data(name, param, rule, layer, cfg, get_hf_tensor, tp_rank, tp_size))
            read.extend(hf_tensors(rule, layer, cfg))
    return read


def export_hf_weights(
    model: nn.Module,
    cfg: LlamaConfig,
    tp_group: Optional[dist.ProcessGroup] = None,
    dtype: Optional[torch.dtype] = None,
    only: Optional[Container[str]] = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield (HF name, full tensor) for this PP stage's weights, gathered over TP (collective:
    every TP rank must iterate). Vocab padding is truncated; tied models emit no lm_head.
    only: restrict to these Megatron (local state-dict) names, to export a stage in pieces."""
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    for name, param, rule, layer in stage_params(model):
        if tied_output(rule, cfg):
            continue
        if only is not None and name not in only:
            continue
        local = param.detach()
        if tp_size > 1 and rule.kind != "replicated":
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
            full = unshard_tp(rule.kind, shards)
        else:
            full = local
        if dtype is not None:
            full = full.to(dtype)
        names = hf_names(rule, layer)
        if rule.kind == "qkv":
            yield from zip(names, (t.contiguous() for t in split_qkv(full, cfg)))
        elif rule.kind == "fc1":
            yield from zip(names, (t.contiguous() for t in split_fc1(full, cfg)))
        elif rule.kind == "vocab":
            yield names[0], full[: cfg.vocab_size].contiguous()
        else:
            yield names[0], full.contiguous()
