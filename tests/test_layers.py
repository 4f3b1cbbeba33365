"""The package's imports point down the layers of DESIGN.md and form no cycle.

Every `import` / `from ... import` in hires/ is read with `ast`, at module level and inside
functions alike (a lazy import is still a dependency), and resolved to the hires module it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hires"

# Layer of each module, lowest first. Pure math modules of the sampling package sit with the
# techniques that use them; the memory planner estimates what the techniques compute, so it and the
# installers that hand its decisions to them (hires.planning) sit above the techniques.
LAYERS = {
    "config": ["hires.config", "hires.registry", "hires.io"],
    "families": ["hires.families", "hires.presets", "hires.presets_redilation"],
    "techniques": ["hires.techniques", "hires.sampling.schedules", "hires.sampling.wavelets", "hires.memory_planner",
                   "hires.planner"],
    "runtime": ["hires.runtime", "hires.guards", "hires.sampling"],
    "surfaces": ["hires.pipelines", "hires.cli", "hires.batch", "hires.__main__", "hires"],
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def layer_of(name: str) -> str:
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    if best is None:
        raise AssertionError(f"{name} has no layer in tests/test_layers.py LAYERS: add it")
    return best


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The hires modules `name` imports (anywhere in its source)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import module` names a module; `from module import name` the module itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("hires") and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_module_imports_a_higher_layer(graph):
    upward = []
    for name, targets in graph.items():
        for target in targets:
            if target == "hires" or name == "hires":
                continue  # the package facade re-exports; importing hires.x runs it, no dependency of x
            if ORDER.index(layer_of(target)) > ORDER.index(layer_of(name)):
                upward.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target == "hires":
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a function-level relative import is found and resolved."""
    modules = all_modules()
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from ..sampling import progressive\n    from . import memory\n")
    found = imports_of("hires.techniques.probe", source, modules)
    assert found == {"hires.sampling.progressive", "hires.techniques.memory"}
