"""The package's import structure: no import cycle inside ``clip_xai`` and no module that imports
an entrypoint (``__main__``) module.

Edges are read from the source with :mod:`ast`; nothing is imported. Every import that runs counts
as an edge: module-level ones and those inside functions (a function-level import is how a cycle
gets hidden, and it still closes the circle at run time the first time the function is called).
Imports under ``if TYPE_CHECKING:`` never run and are left out. An import names the module it
loads: ``from clip_xai.report import stats`` is an edge to ``clip_xai.report.stats`` when that is a
module, else to the package ``clip_xai.report``; the parent packages a dotted import initialises on
the way are not edges (else every package ``__init__`` that re-exports its submodules would be one).
"""
from __future__ import annotations

import ast
from pathlib import Path

import clip_xai

PACKAGE = Path(clip_xai.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> file for every .py file in the package."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node that runs (skipping ``if TYPE_CHECKING:`` bodies)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute module of a (possibly relative) ``from`` import."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the clip_xai modules it imports."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                src = _resolve(mod, is_pkg, node)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_reader_sees_function_level_imports_not_type_checking_ones():
    """The reader itself, on hand-made sources: an import inside a function is read; one under
    TYPE_CHECKING is not; a two-module circle is a cycle, a chain is not."""
    a = ast.parse("import x\ndef f():\n    from pkg import b\n")
    b = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    assert sorted(n.names[0].name for n in _imports(a)) == ["b", "x"]
    assert list(_imports(b)) == [b.body[0]]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_relative_imports_resolve_against_the_package():
    node = ast.parse("from ..report import stats").body[0]
    assert _resolve("clip_xai.studies.base", False, node) == "clip_xai.report"
    assert _resolve("clip_xai.studies", True, ast.parse("from . import base").body[0]) == "clip_xai.studies"


def test_no_import_cycle_inside_clip_xai():
    graph = import_graph()
    assert len(graph) > 50, "the package was not found"
    found = cycles(graph)
    assert not found, "import cycles inside clip_xai: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_an_entrypoint():
    """``__main__`` modules are entrypoints: library code finds the config dir in clip_xai.paths."""
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() for t in ts if t.split(".")[-1] == "__main__")
    assert not bad, "modules importing an entrypoint: " + ", ".join(f"{m} -> {t}" for m, t in bad)
