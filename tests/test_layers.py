"""The package's imports point down the layers of DESIGN.md, form no cycle, and every module has a layer.

Every `import` / `from ... import` in hires/ is read with `ast`, at module level and inside
functions alike (a lazy import is still a dependency), and resolved to the hires module it names.
The checks are functions of an import graph, so the tests below also plant violations in copies of
the real graph and see them caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hires"

# Layer of each module, lowest first. A pattern is a module name, or one with `*` standing for one
# name part; a module takes the pattern with the fewest `*` that matches it.
# - config: torch-free declarations: the shared checks, the technique records and their configs, the
#   catalogue of records, HiresConfig composed from it;
# - families: facts about models, and the presets built from them;
# - sampling: what techniques build on: the stage engine, schedule / wavelet / resize / latent math,
#   the CFG-pair hook and the attention wrapper on the denoiser;
# - techniques: each technique's mechanism modules;
# - runtime: apply / remove and the call state; surfaces: what users touch.
LAYERS = {
    "config": ["hires.validation", "hires.registry", "hires.io", "hires.config", "hires.techniques",
               "hires.techniques.*", "hires.techniques.*.config"],
    "families": ["hires.families", "hires.presets"],
    "sampling": ["hires.sampling", "hires.sampling.*", "hires.denoiser", "hires.denoiser.*"],
    "techniques": ["hires.techniques.*.*"],
    "runtime": ["hires.runtime", "hires.guards"],
    "surfaces": ["hires", "hires.__main__", "hires.pipelines", "hires.cli", "hires.batch"],
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def _matches(pattern: str, name: str) -> bool:
    want, parts = pattern.split("."), name.split(".")
    return len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts))


def layer_of(name: str) -> str:
    found = [(pattern.count("*"), layer, pattern) for layer, patterns in LAYERS.items() for pattern in patterns
             if _matches(pattern, name)]
    if not found:
        raise AssertionError(f"{name} has no layer in tests/test_layers.py LAYERS: add it")
    found.sort()
    if len(found) > 1 and found[0][0] == found[1][0]:
        raise AssertionError(f"{name} matches {found[0][2]!r} and {found[1][2]!r} alike: make one more specific")
    return found[0][1]


def _imports(name: str, path: Path, source: str | None = None):
    """(module, imported name or None) of every import in `name`'s source, relative imports resolved."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            yield from ((origin, alias.name) for alias in node.names)


def imported_names(name: str, path: Path, source: str | None = None) -> set[str]:
    """Every dotted name `name` imports (anywhere in its source), as written."""
    found = set()
    for origin, item in _imports(name, path, source):
        found.add(origin)
        if item is not None:
            found.add(f"{origin}.{item}")
    return found


def imports_of(name: str, path: Path, modules, source: str | None = None) -> set[str]:
    """The hires modules `name` imports (`from package import module` names the module)."""
    found = set()
    for origin, item in _imports(name, path, source):
        target = f"{origin}.{item}" if item is not None and f"{origin}.{item}" in modules else origin
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.startswith("hires") and target != name:
            found.add(target)
    return found


def build_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for name, targets in graph.items():
        for target in targets:
            if target == "hires" or name == "hires":
                continue  # the package facade re-exports; importing hires.x runs it, no dependency of x
            if ORDER.index(layer_of(target)) > ORDER.index(layer_of(name)):
                upward.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    return sorted(upward)


def cycles_in(graph: dict[str, set[str]]) -> list[str]:
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
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return build_graph(all_modules())


def test_every_module_has_exactly_one_layer(graph):
    for name in graph:
        layer_of(name)


def test_the_table_names_real_modules():
    modules = all_modules()
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            assert any(_matches(pattern,
                                name) for name in modules), f"LAYERS[{layer!r}] names {pattern!r}: no such module"


def test_a_module_the_table_does_not_know_is_reported():
    for unknown in ("hires.planner", "hires.techniques.apg.config.extra", "hires.somewhere"):
        with pytest.raises(AssertionError, match="has no layer"):
            layer_of(unknown)


def test_no_module_imports_a_higher_layer(graph):
    upward = upward_imports(graph)
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_a_planted_upward_import_is_found(graph):
    planted = {name: set(targets) for name, targets in graph.items()}
    planted["hires.families"].add("hires.runtime")
    planted["hires.sampling.stages"].add("hires.techniques.apg.combiner")
    assert upward_imports(planted) == [
        "hires.families (families) imports hires.runtime (runtime)",
        "hires.sampling.stages (sampling) imports hires.techniques.apg.combiner (techniques)"]


def test_no_import_cycle(graph):
    cycles = cycles_in(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    planted = {name: set(targets) for name, targets in graph.items()}
    planted["hires.registry"].add("hires.config")
    assert cycles_in(planted)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a function-level relative import is found and resolved."""
    modules = all_modules()
    source = "def f():\n    from ...sampling import stages\n    from .. import memory\n"
    found = imports_of("hires.techniques.apg.probe", tmp_path / "probe.py", modules, source)
    assert found == {"hires.sampling.stages", "hires.techniques.memory"}


def test_moved_module_names_are_the_modules_they_moved_to(graph):
    """Old module paths (hires.MOVED_MODULES) import as the very module they moved to; hires itself uses
    only the new names."""
    import importlib

    import hires

    for old, new in hires.MOVED_MODULES.items():
        assert new in graph, f"{old} points to {new}, which is no module of hires"
        assert old not in graph, f"{old} exists as a module again: drop it from hires.MOVED_MODULES"
        assert importlib.import_module(old) is importlib.import_module(new)
    modules = all_modules()
    users = sorted(f"{name} imports {target}" for name, path in modules.items()
                   for target in imported_names(name, path) if target in hires.MOVED_MODULES)
    assert not users, "\n".join(users)
