"""The package's import layers: no module imports one above it, and no import cycles.

Every import counts, including those inside functions (a lazy import is still a dependency) and
under `if TYPE_CHECKING`. Layers, bottom to top (docs/architecture.md):

    base (config_io, logs, dtypes)  ->  rope  ->  parallel  ->  attention  ->  data  ->  model
    ->  checkpoint  ->  convert  ->  training  ->  eval  ->  CLIs (every */cli.py)

A module may import its own layer and the layers below it. Within a layer, modules may import each
other, but never in a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

PACKAGE = "megatron_ultralong"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
LAYERS = ("base", "rope", "parallel", "attention", "data", "model", "checkpoint", "convert", "training", "eval",
          "cli")
BASE_MODULES = {PACKAGE, f"{PACKAGE}.config_io", f"{PACKAGE}.logs", f"{PACKAGE}.dtypes"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> str:
    if module.endswith(".cli"):
        return "cli"
    if module in BASE_MODULES:
        return "base"
    top = module.split(".")[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: package {top!r} has no place in the layer order {LAYERS}")
    return top


def _resolve(name: str) -> Optional[str]:
    """The package module an imported dotted name refers to (longest existing prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported package module, line) for every import statement anywhere in `module`."""
    path = MODULES[module]
    return imports_in(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` may name a submodule: prefer it when it exists.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.append((target, node.lineno))
    return found


def test_every_package_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_upward_imports():
    upward = []
    for module in MODULES:
        own = LAYERS.index(layer_of(module))
        for target, line in imports_of(module):
            if LAYERS.index(layer_of(target)) > own:
                upward.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line}: {module} ({layer_of(module)}) "
                              f"imports {target} ({layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in imports_of(m)}) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m: str) -> Optional[list[str]]:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_function_level_and_relative_imports():
    """The walker itself: lazy, relative and `from package import submodule` imports are all found."""
    source = (
        "import torch\n"
        "from . import ring\n"
        "def f():\n"
        "    from ..training.trainer import Trainer\n"
        "    from megatron_ultralong import logs\n"
        "    import megatron_ultralong.eval.cli\n"
    )
    found = [t for t, _ in imports_in(source, f"{PACKAGE}.attention.core_attention")]
    assert found == [f"{PACKAGE}.attention.ring", f"{PACKAGE}.training.trainer", f"{PACKAGE}.logs",
                     f"{PACKAGE}.eval.cli"]
    assert [layer_of(t) for t in found] == ["attention", "training", "base", "cli"]
