"""The sections of the device check (benchmarks/gpu_check.py) and what they share.

A section is a function `fn(ctx: Context) -> None` registered with `@section(name)`; it records its
figures with `ctx.record(...)` (or `ctx.skip(...)` with a reason) and runs on the GPU and, at toy
sizes, in the CPU dry run (`ctx.dry`). Sections run in the order of SECTION_MODULES, then of
registration within a module; one that raises is recorded as failed and the next one still runs.
`ctx.cleanup()` runs between sections (and should run between the settings a section loops over),
so one run's memory and peak statistics never leak into the next.

To add a section: write `benchmarks/gpu_sections/<name>.py` with one or more `@section` functions
and add the module name to SECTION_MODULES. Sections that build a model should loop over
`ctx.layer_specs()` so the Transformer Engine spec is measured when TE is importable.
"""
from __future__ import annotations

import gc
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

SECTION_MODULES: tuple[str, ...] = ("env", "cp_kernels", "train_step", "plugin_step", "prefill", "memory_stack")
"""Modules of this package holding sections, in run order."""

LayerSpec = Literal["local", "te"]
"""Megatron-Core layer spec a model section builds: plain torch modules, or Transformer Engine's."""


@dataclass(frozen=True)
class Section:
    """One registered section."""

    name: str
    """Key of its figures in the JSON and prefix of its printed lines."""

    fn: Callable[["Context"], None]
    """Runs the section; records through the Context it is given."""


SECTIONS: list[Section] = []
"""Every registered section, in run order (filled by `load_sections`)."""


def section(name: str) -> Callable[[Callable[["Context"], None]], Callable[["Context"], None]]:
    """Decorator: register `fn(ctx)` as the section `name` (unique)."""
    def register(fn: Callable[["Context"], None]) -> Callable[["Context"], None]:
        if any(s.name == name for s in SECTIONS):
            raise ValueError(f"gpu_check section {name!r} registered twice")
        SECTIONS.append(Section(name, fn))
        return fn
    return register


def load_sections() -> list[Section]:
    """Import every module of SECTION_MODULES (registering its sections) and return SECTIONS."""
    for module in SECTION_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return SECTIONS


@dataclass
class Context:
    """What every section gets: the device, the mode and the figures recorded so far."""

    device: torch.device
    """cuda:0, or cpu in the dry run."""

    dry: bool
    """CPU dry run: toy sizes; GPU-only parts are skipped with their reason."""

    te_available: bool = False
    """Transformer Engine imports here: model sections also run its layer spec."""

    results: dict[str, Any] = field(default_factory=dict)
    """section -> {figure name -> value}; written as the JSON."""

    failed: list[str] = field(default_factory=list)
    """Figures that missed their pass/fail threshold, and sections that raised."""

    def record(self, section: str, name: str, value: Any, unit: str = "") -> None:
        """Store one figure and print it as one line `section.name: value unit`."""
        self.results.setdefault(section, {})[name] = value
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{section}.{name}: {shown}{' ' + unit if unit else ''}", flush=True)

    def check(self, section: str, name: str, value: float, limit: float) -> bool:
        """Record `value` and whether it is <= limit; a miss fails the whole check (exit status 1)."""
        ok = bool(value <= limit)
        self.record(section, name, float(value))
        self.results[section][f"{name}_limit"] = limit
        if not ok:
            self.failed.append(f"{section}.{name} = {value:.3g} > {limit:.3g}")
            print(f"{section}.{name}: FAILED (limit {limit:.3g})", flush=True)
        return ok

    def skip(self, section: str, reason: str) -> None:
        """Record that `section` (or a part of it) did not run here, and why."""
        self.results.setdefault(section, {})["skipped"] = reason
        print(f"{section}: skipped ({reason})", flush=True)

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """The layer specs a model section should measure: local, plus TE when it imports."""
        return ("local", "te") if self.te_available else ("local",)

    def cleanup(self) -> None:
        """Drop garbage and cached CUDA blocks and reset the peak statistics before the next run."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def timed(self, fn: Callable[[], Any], repeat: int = 1) -> float:
        """Seconds per call after one warm-up call (CUDA synchronised around the timed calls)."""
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t0) / repeat
