"""The packages' import graph, read from the source with ``ast`` (nothing is imported).

Every import statement counts, wherever it stands: at module level, inside a function, or under
``if TYPE_CHECKING:``, since each of them ties the two modules together. ``from eqcore import
NAME`` counts as an import of the module that ``eqcore``'s lazy ``_EXPORTS`` table maps NAME to.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Graph:
    """Modules by dotted name, and the in-tree modules each one imports."""

    files: dict[str, Path]
    edges: dict[str, frozenset[str]]


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _lazy_exports(init: Path, package: str) -> dict[str, str]:
    """NAME -> module of a package ``__init__`` that maps names to modules in ``_EXPORTS``."""
    for node in ast.walk(ast.parse(init.read_text(encoding="utf-8"))):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and node.value is not None:
            table = ast.literal_eval(node.value)
            return {name: f"{package}.{module}" for name, module in table.items()}
    return {}


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[list[str]]:
    """For each name an import statement binds, the dotted names it may load, most specific first."""
    if isinstance(node, ast.Import):
        return [[alias.name] for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [[f"{base}.{alias.name}", base] for alias in node.names]


def build_graph(root: Path, packages: tuple[str, ...]) -> Graph:
    """The import graph of ``packages`` (directories under ``root``)."""
    files = {
        _module_name(root, path): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }
    lazy: dict[str, str] = {}
    for package in packages:
        init = root / package / "__init__.py"
        if init.exists():
            lazy.update({f"{package}.{name}": target for name, target in _lazy_exports(init, package).items()})
    edges: dict[str, frozenset[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for candidates in _imported(node, module, is_package):
                found = next((lazy.get(name, name) for name in candidates if name in lazy or name in files), None)
                if found is not None:
                    targets.add(found)
        targets.discard(module)
        edges[module] = frozenset(targets)
    return Graph(files=files, edges=edges)


def find_cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected group of two or more modules, each as one circle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.edges[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(_circle(graph, set(group)))

    for module in sorted(graph.edges):
        if module not in index:
            visit(module)
    return groups


def _circle(graph: Graph, group: set[str]) -> list[str]:
    """One path that leaves the group's first module and comes back to it, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph.edges[module] & group):
                if target == start:
                    return paths[module] + [start]
                if target not in paths:
                    paths[target] = paths[module] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle through {start} in {sorted(group)}")
