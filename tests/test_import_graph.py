"""The package's shape: no import cycle between the modules of ``src/dynnet``, and no module over 600 lines.

The import graph is read from the source with :mod:`ast`, not by importing: an edge ``a → b`` is an import that
runs when ``a`` is imported (module level, class bodies, ``try``/``if`` blocks), within the package. Imports inside
functions are lazy (the way to reach up a floor, or to keep ``dynnet --help`` free of torch) and are not edges;
nor are the imports of an ``if TYPE_CHECKING:`` block. ``from pkg import name`` where ``pkg/__init__.py``
re-exports ``name`` from a submodule is an edge to the module that defines ``name``: a package's ``__init__`` is a
table of contents, and importing a name through it depends on that name's module, not on all of its siblings.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import dynnet

ROOT = Path(dynnet.__file__).resolve().parent  # the dynnet being tested, installed or not
MAX_LINES = 600
"""Longest module, in lines: one concern per module (the style guide: no 2,000-line files)."""

OVER_LIMIT: dict[str, str] = {}
"""Modules known to be longer than :data:`MAX_LINES`, with the reason; an entry fails once the module fits."""


# ------------------------------------------------------------------------------------------- the graph
def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package at ``root`` (``__init__`` → the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def eager_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (not in functions, not under TYPE_CHECKING)."""
    stack: list[ast.AST] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue  # runs when called: a lazy import
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(reversed(node.orelse))
        else:  # class bodies, try/except, if/else, with: they run at import
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


class ImportGraph:
    """The eager imports between the modules of one package.

    Args:
        root: the package's folder (its ``__init__.py`` inside).
    """

    def __init__(self, root: Path) -> None:
        self.files = module_files(root)
        self.trees = {m: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for m, p in self.files.items()}
        self.packages = {m for m, p in self.files.items() if p.name == "__init__.py"}
        self._reexports = {p: self._reexports_of(p) for p in self.packages}
        self.edges = {m: self._edges_of(m) for m in self.files}

    def _reexports_of(self, package: str) -> dict[str, tuple[str, str]]:
        """``name → (module, name there)`` for the ``from X import name`` statements of a package's ``__init__``."""
        out = {}
        for node in eager_imports(self.trees[package]):
            if isinstance(node, ast.ImportFrom):
                base = _base(package, True, node)
                for alias in node.names:
                    out[alias.asname or alias.name] = (base, alias.name)
        return out

    def resolve(self, base: str, name: str, seen: frozenset[tuple[str, str]] = frozenset()) -> str | None:
        """The package module that ``from base import name`` depends on (``None``: outside the package)."""
        if f"{base}.{name}" in self.files:
            return f"{base}.{name}"  # a submodule
        if base not in self.files:
            return None
        target = self._reexports.get(base, {}).get(name)
        if base in self.packages and target is not None and (base, name) not in seen:
            found = self.resolve(*target, seen | {(base, name)})
            if found is not None:
                return found
        return base

    def _edges_of(self, module: str) -> set[str]:
        out = set()
        for node in eager_imports(self.trees[module]):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in self.files)
            else:
                base = _base(module, module in self.packages, node)
                out.update(t for a in node.names if (t := self.resolve(base, a.name)) is not None)
        out.discard(module)  # a package naming what its own __init__ defines
        return out

    def cycles(self) -> list[list[str]]:
        """Every strongly connected component with a cycle, each as one cycle through it (first module repeated
        at the end), found by Tarjan's algorithm."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        components: list[list[str]] = []

        def visit(v: str) -> None:  # recursion depth = the longest import chain, a few dozen
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1 or v in self.edges[v]:
                    components.append(sorted(component))

        for v in sorted(self.files):
            if v not in index:
                visit(v)
        return [self._cycle_in(set(c)) for c in components]

    def _cycle_in(self, component: set[str]) -> list[str]:
        """One cycle through the component's first module (a breadth-first search back to it)."""
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier:
            nxt = []
            for v in frontier:
                for w in sorted(self.edges[v] & component):
                    if w == start:
                        return [*paths[v], start]
                    if w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
            frontier = nxt
        raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def long_modules(root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """Path (relative to ``root``) → line count of every ``.py`` file longer than ``limit`` lines."""
    counts = {
        p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in root.rglob("*.py")
    }
    return {p: n for p, n in sorted(counts.items()) if n > limit}


# ------------------------------------------------------------------------------------------- the checks
def test_no_import_cycle_between_the_modules_of_dynnet() -> None:
    graph = ImportGraph(ROOT)
    assert len(graph.files) > 100 and sum(map(len, graph.edges.values())) > 300  # precondition: a real graph
    cycles = graph.cycles()
    assert not cycles, (
        "import cycles (break one edge with a lazy import, or move the code to its floor):\n"
        + "\n".join(" → ".join(c) for c in cycles)
    )


def test_no_module_of_dynnet_is_over_600_lines() -> None:
    found = long_modules(ROOT)
    over = {p: n for p, n in found.items() if p not in OVER_LIMIT}
    assert not over, f"modules over {MAX_LINES} lines (split them along a seam, one concern per module): {over}"
    fixed = sorted(set(OVER_LIMIT) - set(found))
    assert not fixed, f"{fixed} fit in {MAX_LINES} lines now: remove them from OVER_LIMIT"


# ------------------------------------------------------------------------------ the checks can fail
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_is_found_and_named(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import f\n",
            "b.py": "import pkg.c\n",
            "c.py": "try:\n    import json\nexcept ImportError:\n    class C:\n        from pkg import a\n",
            "d.py": "import pkg.a\n",  # imports into the cycle, not part of it
        },
    )
    graph = ImportGraph(root)
    assert graph.edges["pkg.a"] == {"pkg.b"}
    assert graph.cycles() == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_lazy_and_type_checking_imports_are_not_edges(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.a import A\nelse:\n    import json\n"
                "def f():\n    from pkg import a\n"
                "async def g():\n    import pkg.a\n"
            ),
        },
    )
    graph = ImportGraph(root)
    assert graph.edges == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert graph.cycles() == []


def test_relative_imports_and_package_reexports_resolve_to_the_defining_module(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.sub import Thing as Renamed\n",
            "sub/__init__.py": "from .impl import Thing\nfrom . import other\n",
            "sub/impl.py": "from ..top import helper\n",
            "sub/other.py": "from . import impl\nfrom .impl import missing_name\n",
            "top.py": "from pkg import Renamed\n",  # through two __init__ files to sub/impl: a cycle
        },
    )
    graph = ImportGraph(root)
    assert graph.edges["pkg.sub.impl"] == {"pkg.top"}
    assert graph.edges["pkg.sub.other"] == {"pkg.sub.impl"}
    assert graph.edges["pkg.sub"] == {"pkg.sub.impl", "pkg.sub.other"}
    assert graph.edges["pkg.top"] == {"pkg.sub.impl"}
    assert graph.cycles() == [["pkg.sub.impl", "pkg.top", "pkg.sub.impl"]]


def test_an_inner_module_reading_its_package_reaches_only_what_it_names(tmp_path: Path) -> None:
    """``from pkg import x`` inside ``pkg`` is no cycle with ``pkg/__init__`` when ``x`` comes from elsewhere."""
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.base import x\nfrom pkg.user import y\nlazy = 1\n",
            "base.py": "x = 1\n",
            "user.py": "from pkg import x\ny = x\n",
            "late.py": "from pkg import lazy\n",  # defined in the __init__ itself: an edge to the package
        },
    )
    graph = ImportGraph(root)
    assert graph.edges["pkg.user"] == {"pkg.base"}
    assert graph.edges["pkg.late"] == {"pkg"}
    assert graph.cycles() == []


def test_a_long_module_is_found(tmp_path: Path) -> None:
    root = _package(tmp_path, {"__init__.py": "", "short.py": "x = 1\n" * MAX_LINES, "long.py": "x = 1\n" * 601})
    assert long_modules(root) == {"long.py": 601}


SPOT_CHECKS = {
    "dynnet.cli": lambda e: e and all(m.startswith("dynnet.cli_") for m in e),  # standard library + its own parts
    "dynnet.kernels.spatial": lambda e: {"dynnet.kernels.native", "dynnet.kernels.gemm", "dynnet.kernels.pixels"} <= e,
    # through dynnet.methods.glimpse's re-export to the module that defines RAM
    "dynnet.methods.early_exit.dt_ram": lambda e: {"dynnet.methods.glimpse.ram", "dynnet.train.hooks"} <= e,
    "dynnet.methods.early_exit._model": lambda e: "dynnet.methods.early_exit.calibration" not in e,  # a lazy import
}


@pytest.mark.parametrize("module", sorted(SPOT_CHECKS))
def test_the_graph_sees_the_real_imports(module: str) -> None:
    """Spot checks of the real graph against what the modules are known to import."""
    edges = ImportGraph(ROOT).edges[module]
    assert SPOT_CHECKS[module](edges), sorted(edges)


def all_imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[str]:
    """Every module named by an import of ``module``, lazy ones included (relative imports resolved)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node)
            yield from (f"{base}.{a.name}" for a in node.names)


def private_reaches(graph: ImportGraph) -> list[str]:
    """Imports (lazy ones included) from one ``<package>.methods.<family>`` into another family's private module."""
    found = []
    for module, tree in graph.trees.items():
        parts = module.split(".")
        if parts[1:2] != ["methods"] or len(parts) < 3:
            continue
        for name in all_imports(tree, module, module in graph.packages):
            other = name.split(".")
            private = any(p.startswith("_") and not p.startswith("__") for p in other[3:])
            if other[:2] == parts[:2] and len(other) > 3 and other[2] != parts[2] and private:
                found.append(f"{module} imports {name}")
    return found


def test_no_method_family_reaches_into_another_familys_private_modules() -> None:
    """A family builds on another only through its public API (DT-RAM on :mod:`dynnet.methods.glimpse`)."""
    assert private_reaches(ImportGraph(ROOT)) == []


def test_a_reach_into_another_familys_private_module_is_found(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "methods/__init__.py": "",
            "methods/a/__init__.py": "",
            "methods/a/_common.py": "",
            "methods/a/r.py": "from ._common import x\n",  # its own family: fine
            "methods/b/__init__.py": "",
            "methods/b/s.py": "def f():\n    from pkg.methods.a._common import x\n",  # lazy, still a reach
            "methods/b/t.py": "from pkg.methods.a import r\n",  # public: fine
        },
    )
    assert private_reaches(ImportGraph(root)) == ["pkg.methods.b.s imports pkg.methods.a._common.x"]
