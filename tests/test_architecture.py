"""Architecture rules checked on the source text: no import cycles between cryoves' modules.

Every ``import`` of every module counts, at module level and inside functions: a cycle that only
closes through a function-level import is still two modules that cannot be understood (or tested)
one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cryoves

PACKAGE_DIR = Path(cryoves.__file__).parent


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    """``cryoves/io/mrc.py`` → ``cryoves.io.mrc``; a package's ``__init__.py`` is the package itself."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imported(node: ast.AST, current: str, is_package: bool) -> list[str]:
    """The dotted names one import statement refers to (``from a import b`` → ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    return [f"{stem}.{alias.name}" for alias in node.names] + [stem]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the package that ``name`` names: itself, else its longest module prefix."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source."""
    modules = package_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names = _imported(node, mod, is_package)
            if isinstance(node, ast.ImportFrom):
                # ``from pkg import name``: the submodule pkg.name when it is one, else pkg itself
                *members, stem = names
                sub = [m for m in members if m in modules]
                targets = sub if len(sub) == len(members) else [*sub, stem]
            else:
                targets = names
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != mod:
                    graph[mod].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_cycle(graph, set(comp)) for comp in components]


def _shortest_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)  # unreachable for a strongly connected component


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles between cryoves modules:\n" + "\n".join(" -> ".join(c) for c in found)


def collapse(graph: dict[str, set[str]], depth: int = 2) -> dict[str, set[str]]:
    """The graph between the package's top-level parts: ``cryoves.io.mrc`` counts as ``cryoves.io``."""

    def top(m: str) -> str:
        return ".".join(m.split(".")[:depth])

    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        out.setdefault(top(mod), set()).update(top(t) for t in targets if top(t) != top(mod))
    return out


def test_no_import_cycles_between_subpackages():
    """E.g. ``vesicles`` -> ``io.atomic`` while ``io.tables`` -> ``vesicles`` is a cycle between the
    ``io`` package and ``vesicles`` even though no two modules import each other."""
    found = cycles(collapse(import_graph()))
    assert not found, "import cycles between cryoves' top-level parts:\n" + "\n".join(" -> ".join(c) for c in found)


#: Building blocks, and the modules that compose them (docs/architecture.md).
LOWER = ("cryoves.errors", "cryoves.atomic", "cryoves.vesicles", "cryoves.io", "cryoves.preprocess",
         "cryoves.postprocess", "cryoves.model", "cryoves.device", "cryoves.results", "cryoves.parallel")
UPPER = ("cryoves.pipeline", "cryoves.blockwise", "cryoves.batch", "cryoves.cli", "cryoves.napari")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_building_blocks_do_not_import_what_composes_them():
    bad = sorted((m, t) for m, targets in import_graph().items() if _within(m, LOWER)
                 for t in targets if _within(t, UPPER))
    assert not bad, "lower layers import upper ones:\n" + "\n".join(f"{m} -> {t}" for m, t in bad)


def test_graph_sees_every_import_form(tmp_path):
    pkg = tmp_path / "cryoves"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    import cryoves.a\n")
    (pkg / "a.py").write_text("from cryoves.sub import leaf\nfrom .b import thing\n")
    (pkg / "b.py").write_text("thing = 1\n\ndef g():\n    from cryoves import sub\n")
    graph = import_graph(pkg)
    assert graph["cryoves.sub"] == {"cryoves.sub.leaf"}
    assert graph["cryoves.sub.leaf"] == {"cryoves.a"}
    assert graph["cryoves.a"] == {"cryoves.sub.leaf", "cryoves.b"}
    assert graph["cryoves.b"] == {"cryoves.sub"}
    assert cycles(graph) == [["cryoves.a", "cryoves.sub.leaf", "cryoves.a"]]
    (pkg / "b.py").write_text("thing = 1\n")
    assert cycles(import_graph(pkg)) == [["cryoves.a", "cryoves.sub.leaf", "cryoves.a"]]
    assert cycles(collapse({"cryoves.io.tables": {"cryoves.vesicles"}, "cryoves.vesicles": {"cryoves.io.atomic"},
                            "cryoves.io.atomic": set()})) == [["cryoves.io", "cryoves.vesicles", "cryoves.io"]]
