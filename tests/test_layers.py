"""Which way the layers depend, read from the source with `ast` (nothing is imported).

cli -> server -> api -> engine -> runner: a layer imports only those to its
right. The engine knows no HTTP, only the runner touches llama.cpp, only a
cluster module may use Ray, and no fireside module imports itself round a
circle. Every import counts, including those inside functions; only for
circles are `if TYPE_CHECKING:` imports left out, since they never run.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fireside"

HTTP_LIBRARIES = {"fastapi", "starlette", "pydantic", "pydantic_core", "uvicorn", "httpx"}
# Each layer and the fireside layers it must never import.
FORBIDDEN_LAYERS = {
    "fireside.runner": ("fireside.engine", "fireside.api", "fireside.server", "fireside.cli"),
    "fireside.engine": ("fireside.api", "fireside.server", "fireside.cli"),
    "fireside.api": ("fireside.server", "fireside.cli"),
    "fireside.server": ("fireside.cli",),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. fireside.engine.engine
    target: str  # what it imports, resolved: fireside.engine.types, numpy, llama_cpp.mtmd_cpp
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def find_modules(package: Path) -> dict[str, Path]:
    """Module name -> file, for every file of the package."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = find_modules(PACKAGE)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(
    module: str, node: ast.ImportFrom, is_package: bool, modules: dict[str, Path]
) -> list[str]:
    """The modules a `from X import a, b` reaches: X.a where that is a module, else X."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    targets = []
    for alias in node.names:
        child = f"{source}.{alias.name}"
        targets.append(child if child in modules else source)
    return targets


def imports_of(module: str, modules: dict[str, Path] = MODULES) -> list[Import]:
    path = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom):
            for target in dict.fromkeys(_resolve_from(module, node, is_package, modules)):
                found.append(Import(module, target, node.lineno, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return found


IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_source_tree_is_found_and_read():
    # A wrong path would make every other test here pass vacuously.
    assert "fireside.engine.scheduler" in MODULES and "fireside.api.app" in MODULES
    assert any(imp.top == "llama_cpp" for imp in IMPORTS)
    assert any(imp.target == "fireside.engine.types" for imp in IMPORTS)


def test_imports_inside_functions_and_relative_imports_are_read(tmp_path):
    package = tmp_path / "fireside"
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "types.py").write_text("")
    (package / "engine" / "core.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import types\n"
        "from .types import X\n"
        "if TYPE_CHECKING:\n"
        "    from fireside.api import app\n"
        "def f():\n"
        "    import httpx\n"
    )
    got = {
        (i.target, i.type_only) for i in imports_of("fireside.engine.core", find_modules(package))
    }
    assert ("fireside.engine.types", False) in got
    assert ("fireside.api", True) in got
    assert ("httpx", False) in got


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
    bad = [
        str(imp)
        for imp in IMPORTS
        if _within(imp.module, layer)
        and any(_within(imp.target, above) for above in FORBIDDEN_LAYERS[layer])
    ]
    assert not bad, "\n".join(bad)


def test_the_engine_never_imports_an_http_library():
    bad = [
        str(imp)
        for imp in IMPORTS
        if _within(imp.module, "fireside.engine") and imp.top in HTTP_LIBRARIES
    ]
    assert not bad, "\n".join(bad)


def test_only_the_runner_imports_llama_cpp():
    bad = [
        str(imp)
        for imp in IMPORTS
        if imp.top == "llama_cpp" and not _within(imp.module, "fireside.runner")
    ]
    assert not bad, "\n".join(bad)


def test_only_a_cluster_module_imports_ray():
    bad = [
        str(imp)
        for imp in IMPORTS
        if imp.top == "ray" and not _within(imp.module, "fireside.cluster")
    ]
    assert not bad, "\n".join(bad)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan),
    or a module that imports itself; each as a path round the circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges.get(v, ()):
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_path_round(group, edges) for group in groups]


def _path_round(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One circle through the group's first module, for the failure message."""
    start = group[0]
    members = set(group)
    paths = [[start]]
    seen = {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(edges.get(path[-1], ()) & members):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    return group


def test_circles_are_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_circles(edges)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_between_fireside_modules():
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if not imp.type_only and imp.target in MODULES and imp.target != imp.module:
            edges[imp.module].add(imp.target)
    circles = _circles(edges)
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)
