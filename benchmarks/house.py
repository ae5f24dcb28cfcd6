"""The shape of the package: module sizes, long functions, function-local imports and import cycles.

    python benchmarks/house.py [--max-module 350] [--max-function 60]

Prints one table per measure and exits 1 when a module or function is over its limit or the import
graph (every import, function-local ones included) has a cycle, so it can gate a refactor.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "abliterate"


def module_name(path: Path) -> str:
    """``abliterate/x/y.py`` → ``abliterate.x.y`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(tree: ast.Module, name: str, modules: set[str]) -> tuple[set[str], int]:
    """The package modules ``tree`` imports (at any depth), and how many imports sit inside functions."""
    found: set[str] = set()
    local = 0
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: -node.level] if not name.endswith("__init__") else name
                base = ".".join([*package, node.module])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        hits = {t for t in targets if t in modules and t != name}
        if hits and id(node) in inside:
            local += 1
        found |= hits
    return found, local


# The layers, lowest first: a module may import its own layer and the layers below it.
LAYERS = {
    "adapters": 0,
    "io": 0,
    "errors": 0,
    "edit": 1,
    "model": 2,
    "config": 2.5,
    "find": 3,
    "prove": 4,
    "ship": 5,
    "pipeline": 6,
    "cli": 7,
    "abliterate": 8,
}


def layer_of(module: str) -> float:
    """The layer of ``abliterate.x.y`` (its first name below the package); the package itself is on top."""
    parts = module.split(".")
    return LAYERS.get(parts[1] if len(parts) > 1 else "abliterate", 8)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that point up the layer order (``LAYERS``)."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-module", type=int, default=350)
    parser.add_argument("--max-function", type=int, default=60)
    args = parser.parse_args()
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    trees = {name: ast.parse(path.read_text("utf-8")) for name, path in paths.items()}
    graph: dict[str, set[str]] = {}
    local_imports = 0
    for name, tree in trees.items():
        graph[name], local = imports_of(tree, name, set(paths))
        local_imports += local
    # ``from abliterate import x`` names the package; the edge that matters is to ``abliterate.x``.
    for targets in graph.values():
        targets.discard("abliterate")

    sizes = sorted(((len(p.read_text("utf-8").splitlines()), n) for n, p in paths.items()), reverse=True)
    big = [(lines, name) for lines, name in sizes if lines > args.max_module]
    long_functions = sorted(
        (node.end_lineno - node.lineno + 1, f"{name}.{node.name}")
        for name, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > args.max_function
    )
    found = cycles(graph)

    print(f"{len(paths)} modules, {sum(lines for lines, _ in sizes)} lines; largest:")
    for lines, name in sizes[:10]:
        print(f"  {lines:5d}  {name}")
    print(f"modules over {args.max_module} lines: {len(big)}")
    print(f"functions over {args.max_function} lines: {len(long_functions)}")
    for lines, name in reversed(long_functions):
        print(f"  {lines:5d}  {name}")
    print(f"function-local imports of package modules: {local_imports}")
    print(f"import cycles (function-local imports included): {len(found)}")
    for component in found:
        print("  " + " ↔ ".join(component))
    against = upward(graph)
    print(
        f"imports against the layer order (adapters/io → edit → model → config → find → prove → ship → "
        f"pipeline → cli): {len(against)}"
    )
    for importer, imported in against:
        print(f"  {importer} → {imported}")
    return 1 if big or long_functions or found or against else 0


if __name__ == "__main__":
    sys.exit(main())
