"""The import graph between uro_recs' packages, drawn from the code: `python -m tests.layout`.

Reads every module of the install (the folders pyproject.toml maps onto the `uro_recs`
namespace) with `ast`, without importing anything, and prints which package imports which,
each edge with the modules that make it; imports inside functions (made when called, not when
the module loads) are marked "lazy". Then lists the cycles between packages. `--check` exits
with status 1 when there is one.

`--base-imports`, run with the Python of a base install (`pip install .`, no extra), imports
every module of the packages that install promises (BASE_PACKAGES) and exits with status 1
if one fails.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "uro_recs"
# What `pip install uro-recs` must fully support; the other packages need an extra.
BASE_PACKAGES = ("uro_recs.core", "uro_recs.sdk", "uro_recs.broker", "uro_recs.app")


@dataclass(frozen=True, order=True)
class Import:
    source: str  # module that imports
    target: str  # module (or package) imported
    lazy: bool  # inside a function body


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def modules() -> dict[str, Path]:
    """Every module of the install: dotted name -> file."""
    found: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def package_of(module: str, packages: set[str]) -> str:
    """The innermost mapped package holding `module` (a package holds itself)."""
    if module in packages:
        return module
    parts = module.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in packages:
            return candidate
    return module


def imports(module: str, path: Path, is_package: bool) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    base = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, lazy)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base.rsplit(".", child.level - 1)[0] if child.level > 1 else base
                    target = f"{anchor}.{child.module}" if child.module else anchor
                else:
                    target = child.module or ""
                for alias in child.names:
                    # `from pkg import module` imports the module when there is one.
                    yield Import(module, f"{target}.{alias.name}", lazy)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # typing only: no import at run time
            yield from visit(child, inner)

    yield from visit(tree, False)


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def package_graph() -> dict[tuple[str, str], list[Import]]:
    """(importing package, imported package) -> the imports that make the edge."""
    found = modules()
    packages = set(package_dirs())
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for module, path in found.items():
        source = package_of(module, packages)
        for imp in imports(module, path, path.stem == "__init__"):
            if not imp.target.startswith(NAMESPACE):
                continue
            target_module = imp.target if imp.target in found else imp.target.rpartition(".")[0]
            target = package_of(target_module, packages)
            if target != source:
                edges[(source, target)].append(Import(module, target_module, imp.lazy))
    return edges


def cycles(edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def import_base_modules() -> list[str]:
    """Import every module of BASE_PACKAGES; returns one line per failure."""
    failures = []
    for name in modules():
        if name.startswith(BASE_PACKAGES):
            try:
                importlib.import_module(name)
            except Exception as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a cycle")
    parser.add_argument(
        "--base-imports", action="store_true", help="import the base install's modules"
    )
    args = parser.parse_args(argv)
    if args.base_imports:
        failures = import_base_modules()
        for line in failures:
            print(f"cannot import in a base install: {line}")
        if not failures:
            print(f"every module of {', '.join(BASE_PACKAGES)} imports in a base install")
        return 1 if failures else 0
    edges = package_graph()
    for (source, target), made_by in sorted(edges.items()):
        eager = sorted({f"{i.source} -> {i.target}" for i in made_by if not i.lazy})
        lazy = sorted({f"{i.source} -> {i.target}" for i in made_by if i.lazy})
        print(f"{source} -> {target}{'' if eager else '  (lazy only)'}")
        for line in eager:
            print(f"    {line}")
        for line in lazy:
            print(f"    {line}  (lazy)")
    found = cycles(edges)
    for component in found:
        print(f"cycle between packages: {', '.join(component)}")
    if not found:
        print("no cycle between packages")
    return 1 if found and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
