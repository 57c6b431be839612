"""The interface every benchmark of the suite implements, and the registry that names them.

A benchmark is a list of cells (one cell = one grid entry: a RULER task at one length, a NIAH
length and depth, an LV-Eval dataset at one length level, ...). The suite runner routes each cell
to a backend by its prompt size, runs it through the grid runner (so it is resumable: a killed run
re-run with the same --out computes only the missing cells), and finally asks the benchmark for
its aggregates, which become rows of the results table.

    class MyBench:                           # registered with @register("mybench")
        name = "mybench"
        def header(self) -> dict: ...          # everything that changes results (grid header)
        def cells(self) -> list[BenchCell]: ...
        def run_cell(self, cell, backend, tokenizer) -> dict: ...   # JSON-serialisable, has "score"
        def aggregate(self, results: dict[str, dict]) -> dict[str, float]: ...  # {column: percent}
        def finish(self, results, out_dir) -> None: ...  # optional: the benchmark's own files
        def check_inputs(self) -> None: ...    # optional: read data files before any model loads

`make(name, options)` builds a registered benchmark from the suite config's section for it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from megatron_ultralong.eval.grid import BenchCell
from megatron_ultralong.eval.tokenizer import EvalTokenizer

__all__ = ["BenchCell", "Benchmark", "BENCHMARKS", "register", "make"]


class Benchmark(Protocol):
    name: str

    def header(self) -> dict:
        """Everything that changes this benchmark's results (config, data files' identity)."""
        ...

    def cells(self) -> list[BenchCell]:
        ...

    def run_cell(self, cell: BenchCell, backend: Any, tokenizer: EvalTokenizer) -> dict:
        """Run one cell; a JSON-serialisable dict with at least "score" (percent)."""
        ...

    def aggregate(self, results: dict[str, dict]) -> dict[str, float]:
        """Table columns from the finished cells ({cell key: run_cell's result}); columns whose
        cells are not all finished are left out."""
        ...


BenchmarkFactory = Callable[[dict], Benchmark]
BENCHMARKS: dict[str, BenchmarkFactory] = {}
"""name -> factory(options from the suite config's section) for every registered benchmark."""


def register(name: str) -> Callable[[BenchmarkFactory], BenchmarkFactory]:
    """Decorator: register a benchmark factory under `name` (the suite config's key)."""
    def add(factory: BenchmarkFactory) -> BenchmarkFactory:
        if name in BENCHMARKS and BENCHMARKS[name] is not factory:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = factory
        return factory
    return add


def make(name: str, options: Optional[dict]) -> Benchmark:
    """The benchmark `name` built from its options; ValueError naming an unknown one."""
    _load_builtin()
    if name not in BENCHMARKS:
        raise ValueError(f"benchmarks.{name}: unknown benchmark; registered: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](dict(options or {}))


def _load_builtin() -> None:
    """Import the modules that register the project's benchmarks (registration is an import side
    effect; listed here so that the registry is complete whoever imports it first)."""
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


BUILTIN_MODULES: list[str] = ["megatron_ultralong.eval.suite.builtin", "megatron_ultralong.eval.suite.lveval_bench",
                              "megatron_ultralong.eval.suite.infinitebench_bench"]
"""Modules whose import registers benchmarks: NIAH and RULER, LV-Eval, InfiniteBench."""
