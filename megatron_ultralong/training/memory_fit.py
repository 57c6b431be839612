"""Fitting the memory model to a device: the ladder of memory-saving settings, cheapest first, and
the first rung whose estimate (training/memory.py) fits; the device's memory and the trainer's
start-up line.

`choose_recompute` is what `mu-train --dry-run`, the config check and benchmarks/memory_plan.py call,
so the one-node recipes (examples/recipes/*_8gpu*.yaml) are the rung they would all pick.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from megatron_ultralong.model.config import LlamaConfig
from megatron_ultralong.training.memory import Layout, MemoryEstimate, estimate_layout, estimate_memory, resolved_mlp_tiles

RECOMPUTE_LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ()),
    ("selective", ("layernorm",)),
    ("selective", ("layernorm", "mlp")),
    ("full", ()),
)
"""megatron-core's recompute settings from cheapest to most memory-saving (the first rungs of
`MEMORY_LADDER`)."""


@dataclass(frozen=True)
class Rung:
    """One memory-saving setting (`choose_recompute` walks `MEMORY_LADDER`, cheapest first)."""

    recompute: str
    """"none", "selective" or "full"."""
    recompute_modules: tuple[str, ...] = ()
    """With selective."""
    mlp_tiles: int = 1
    """1 = off; 0 = ceil(local tokens / MLP_TILE_TOKENS)."""
    activation_offload: float = 0.0
    """Fraction of layers whose saved sets go to host memory."""
    optimizer_offload: float = 0.0
    """Fraction of the optimizer state on the host."""


MEMORY_LADDER: tuple[Rung, ...] = (
    *(Rung(mode, modules) for mode, modules in RECOMPUTE_LADDER[:3]),
    Rung("selective", ("layernorm",), mlp_tiles=0),
    Rung("full"),
    Rung("full", mlp_tiles=0),
    Rung("full", mlp_tiles=0, activation_offload=0.5),
    Rung("full", mlp_tiles=0, activation_offload=1.0),
    Rung("full", mlp_tiles=0, activation_offload=1.0, optimizer_offload=1.0),
)
"""Recompute, tiling and offload from cheapest to most memory-saving: recompute costs forward
FLOPs (an MLP forward per tiled or "mlp" layer, a whole layer with full), offload costs host memory
and PCIe time that overlaps compute, the optimizer offload a host-side Adam step."""


def apply_rung(lay: Layout, rung) -> Layout:
    """`lay` with a ladder rung's settings (a `Rung`, or a (recompute, modules) pair)."""
    if not isinstance(rung, Rung):
        rung = Rung(*rung)
    tiled = replace(lay, mlp_tiles=rung.mlp_tiles)
    return replace(lay, recompute=rung.recompute, recompute_modules=tuple(rung.recompute_modules),
                   mlp_tiles=resolved_mlp_tiles(tiled), activation_offload=rung.activation_offload,
                   optimizer_offload=rung.optimizer_offload)


def choose_recompute(cfg: LlamaConfig, lay: Layout, budget_bytes: float, ladder: Sequence = MEMORY_LADDER,
                     host_budget_bytes: Optional[float] = None) -> Optional[Layout]:
    """The first (cheapest) rung of `ladder` whose device total fits `budget_bytes` and, when given,
    whose host bytes per GPU fit `host_budget_bytes`; None if none does."""
    for rung in ladder:
        candidate = apply_rung(lay, rung)
        est = estimate_layout(cfg, candidate)
        if est.total <= budget_bytes and (host_budget_bytes is None or est.host_total <= host_budget_bytes):
            return candidate
    return None


def device_memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    return float("nan")


def estimate_memory_per_device(model_cfg: LlamaConfig, train_cfg, dp: int) -> MemoryEstimate:
    """The trainer's call: `estimate_memory` with the world rebuilt from DP."""
    p = train_cfg.parallel
    world = dp * p.tensor_parallel * p.context_parallel * p.pipeline_parallel
    return estimate_memory(train_cfg, world, model_cfg)


def format_estimate(e: MemoryEstimate, device: torch.device) -> str:
    unit, scale = ("GiB", 2**30) if e.total >= 2**30 else ("MiB", 2**20)
    parts = ", ".join(f"{name} {getattr(e, name) / scale:.2f}" for name in e.DEVICE_FIELDS)
    host = f"; host memory per device {e.host_total / 2**30:.2f} GiB (offload)" if e.host_total else ""
    return (
        f"[train] memory estimate per device: {e.total / scale:.2f} {unit} ({parts}) of "
        f"{device_memory_bytes(device) / 2**30:.1f} GiB on {device}{host}"
    )
