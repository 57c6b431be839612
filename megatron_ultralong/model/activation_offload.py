"""Activation offload: what chosen layers keep for backward waits in host memory, not on the device.

With full recompute a layer keeps only its input (2h/TP bytes per token in bf16 with sequence
parallelism), yet over 32 layers and 1M tokens that is 34 GiB per GPU, the largest term of a
one-node plan (training/memory.py). `ActivationOffload` moves every tensor the offloaded layers save
for backward (under full recompute: the checkpoint's input; otherwise the layer's whole saved set,
the CP attention's q/k/v/out/lse included) to a host pool during forward, and brings it back in
backward one layer ahead of its use, so at most two layers' sets are on the device at once
(double buffering).

How: a `torch.autograd.graph.saved_tensors_hooks` context spans the decoder block's forward (forward
pre-hook / post-hook on megatron's `TransformerBlock`), and forward pre-hooks on the layers tell the
pack hook whose tensor it sees. Parameters, and the tensors the block receives for every layer (the
rotary angles, masks, packed-sequence offsets), stay where they are. A tensor saved twice (a view
saved by two ops) is moved once.

Why not megatron-core's own offloading: `cpu_offloading` (layer-level) refuses activation recompute
(TransformerConfig.__post_init__: "CPU offloading does not work when activation recomputation is
enabled"), and `fine_grained_activation_offloading` offloads the inputs of named modules
(attn_norm, qkv_linear, core_attn, ...) of non-recomputed layers, driven by its pipeline schedules
(`off_interface.init_chunk_handler` in GPTModel.forward, `reset` in schedules.py) with CUDA streams
created at start-up; neither sees the input a full-recompute checkpoint saves, which is the term
that dominates here. Pools:

- `PinnedHostPool` (GPU): page-locked host buffers (torch's caching host allocator), device-to-host
  copies on a side stream after the tensor is produced, host-to-device copies of the next layer
  issued on another side stream when a layer's backward starts; `record_stream` keeps the device
  memory of a copy in flight alive.
- `ByteStorePool` (CPU processes, and the tests): the bytes go into Python `bytes` objects, outside
  torch's allocator, so the allocator probe (tests/memory_probe.py) sees them leave; `stored_bytes`
  counts them.
"""
from __future__ import annotations

import ctypes
import dataclasses
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn


@dataclasses.dataclass(eq=False)
class _Offloaded:
    """A saved tensor that lives in a host pool until its backward."""

    layer: int
    host: Any
    """The pool's record (pinned tensor + event, or bytes)."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    on_device: Optional[Tensor] = None
    """Set by a prefetch: the device copy, consumed (and dropped) by the first unpack."""
    loaded: Any = None


class ByteStorePool:
    """Host pool of a CPU process: a tensor's bytes in a Python `bytes`, back as a fresh tensor."""

    def __init__(self) -> None:
        self.stored_bytes = 0
        """Bytes stored since the last `reset_count` (one forward's offload)."""

    def reset_count(self) -> None:
        self.stored_bytes = 0

    def store(self, t: Tensor) -> bytes:
        src = t.detach().contiguous()
        # A byte copy straight from the tensor's memory: exporting the tensor itself to numpy would
        # mark its storage non-resizable, and megatron's "layernorm" recompute resizes that storage
        # to 0 once the norm output is saved (CheckpointWithoutOutput.discard_output...).
        data = ctypes.string_at(src.data_ptr(), src.numel() * src.element_size())
        self.stored_bytes += len(data)
        return data

    def prefetch(self, item: _Offloaded) -> None:
        if item.on_device is None:
            raw = torch.frombuffer(bytearray(item.host), dtype=torch.uint8)
            item.on_device = raw.view(item.dtype).view(item.shape).clone()

    def load(self, item: _Offloaded) -> Tensor:
        self.prefetch(item)
        out, item.on_device = item.on_device, None
        return out


class PinnedHostPool:
    """Host pool of a GPU process: pinned buffers, copies on side streams (see module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.d2h = torch.cuda.Stream(device)
        self.h2d = torch.cuda.Stream(device)
        self.stored_bytes = 0

    def reset_count(self) -> None:
        self.stored_bytes = 0

    def store(self, t: Tensor):
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.d2h.wait_stream(torch.cuda.current_stream(t.device))  # t is ready on the compute stream
        with torch.cuda.stream(self.d2h):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        t.record_stream(self.d2h)  # the allocator keeps t's memory until the copy has run
        self.stored_bytes += host.numel() * host.element_size()
        return host, done

    def prefetch(self, item: _Offloaded) -> None:
        if item.on_device is not None:
            return
        host, stored = item.host
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(stored)
            dev = torch.empty(item.shape, dtype=item.dtype, device=item.device)
            dev.copy_(host, non_blocking=True)
            loaded = torch.cuda.Event()
            loaded.record(self.h2d)
        item.on_device, item.loaded = dev, loaded

    def load(self, item: _Offloaded) -> Tensor:
        self.prefetch(item)
        current = torch.cuda.current_stream(item.device)
        current.wait_event(item.loaded)
        out, item.on_device = item.on_device, None
        out.record_stream(current)  # allocated on the side stream, used on the compute stream
        return out


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors_in(getattr(value, f.name))]
    return []


class ActivationOffload:
    """Offload what the first `round(fraction x layers)` layers of `block` save for backward.

    block: megatron-core's `TransformerBlock` (a model's `decoder`). pool: `PinnedHostPool` on GPU,
    `ByteStorePool` on CPU. The first layers are chosen because their backward comes last, which
    leaves the most time to bring them back. `remove()` detaches the hooks.
    """

    def __init__(self, block: nn.Module, fraction: float, pool) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"model.activation_offload={fraction}: expected a fraction in [0, 1]")
        layers = list(block.layers)
        self.num_offloaded = offloaded_layer_count(fraction, len(layers))
        self.pool = pool
        self._params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        self._current: Optional[int] = None
        self._keep: set[int] = set()
        self._dedup: dict[int, tuple] = {}
        self._groups: dict[int, list[_Offloaded]] = {}
        self._hooks_ctx = None
        self._handles = [
            block.register_forward_pre_hook(self._enter, with_kwargs=True),
            block.register_forward_hook(self._exit, always_call=True),
        ]
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i)))
        final_norm = getattr(block, "final_layernorm", None)
        if final_norm is not None:
            self._handles.append(final_norm.register_forward_pre_hook(self._layer_hook(None)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _layer_hook(self, index: Optional[int]):
        def hook(module, args):
            self._current = index
        return hook

    def _enter(self, module, args, kwargs):
        if not torch.is_grad_enabled() or self.num_offloaded == 0:
            return None
        self.pool.reset_count()
        self._current, self._dedup, self._groups = None, {}, {}
        # Everything the block gets besides the hidden states is shared by all layers: keep it.
        shared = [t for k, v in kwargs.items() if k != "hidden_states" for t in _tensors_in(v)]
        shared += [t for v in args[1:] for t in _tensors_in(v)]
        self._keep = {t.untyped_storage().data_ptr() for t in shared}
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks_ctx.__enter__()
        return None

    def _exit(self, module, args, output):
        if self._hooks_ctx is not None:
            self._hooks_ctx.__exit__(None, None, None)
            self._hooks_ctx = None
        self._current, self._dedup = None, {}

    def _pack(self, t: Tensor):
        layer = self._current
        if layer is None or layer >= self.num_offloaded or t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._params or ptr in self._keep or t.numel() == 0:
            return t
        # The same tensor object saved twice is stored once. Keyed by the object (a weak reference
        # confirms it is still the same one): a storage address can be reused by a later tensor
        # once the original is freed, which is the point of offloading.
        seen = self._dedup.get(id(t))
        if seen is not None and seen[0]() is t and seen[1][1] == t._version:
            return seen[1][0]
        item = _Offloaded(layer, self.pool.store(t), t.shape, t.dtype, t.device)
        self._dedup[id(t)] = (weakref.ref(t), (item, t._version))
        self._groups.setdefault(layer, []).append(item)
        return item

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        # This layer's backward has started: bring the next one (the layer below) back meanwhile.
        for item in self._groups.get(packed.layer - 1, ()):
            self.pool.prefetch(item)
        return self.pool.load(packed)


def offloaded_layer_count(fraction: float, num_layers: int) -> int:
    """Layers `model.activation_offload = fraction` offloads (the memory model uses the same count)."""
    return int(round(fraction * num_layers))


def host_pool_for(device: torch.device):
    """The pool a run on `device` offloads into."""
    return PinnedHostPool(device) if device.type == "cuda" else ByteStorePool()
