"""The package's import structure: no import cycle inside ``clip_xai``, no module that imports
an entrypoint (``__main__``) module, and no import upward between the layers of :data:`LAYERS`.

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


# The layers, bottom first. A module may import modules of its own layer and of lower ones, never
# of a higher one. Entries are packages or modules relative to ``clip_xai``; a module belongs to the
# longest entry that is its name or a dotted prefix of it, so a new file in a room (say
# ``studies/deletion_insertion.py``) is in its room's layer without being listed here. ``__init__``
# is the package ``clip_xai`` itself (it exposes the API lazily).
LAYERS: list[tuple[str, ...]] = [
    # core: import nothing of clip_xai but each other. perf.timing (the study loop's phase timer) and
    # perf.precision_table (read by config for precision=auto) are the measurement pieces the
    # pipeline itself uses; the rest of perf measures the pipeline from above.
    ("errors", "types", "seeds", "paths", "schema", "provenance", "progress", "overlay",
     "perf.timing", "perf.precision_table"),
    ("sinks",),  # run outputs: results.parquet (its atomic write also serves data.prepare), W&B
    ("models",),
    ("data",),
    ("config",),  # Hydra config -> objects; open_clip resolvers, precision (models.fp8)
    ("explainers",),
    ("perturbations",),
    ("metrics",),
    ("studies",),
    ("report", "perf"),
    ("api",),
    ("__main__", "__init__"),  # the entrypoint; the package's lazy API
]


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a dotted ``clip_xai`` module (None: in no layer)."""
    rel = module.split(".", 1)[1] if "." in module else "__init__"
    best, index = -1, None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (rel == entry or rel.startswith(entry + ".")) and len(entry) > best:
                best, index = len(entry), i
    return index


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module into a higher layer, as ``a (layer) -> b (layer)``."""
    name = lambda i: "/".join(LAYERS[i])  # noqa: E731
    return [f"{m} ({name(layer_of(m))}) -> {t} ({name(layer_of(t))})" for m, ts in sorted(graph.items())
            for t in sorted(ts) if layer_of(t) > layer_of(m)]


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


def test_layers_place_modules_by_their_room():
    """Longest entry wins; a new file falls into its room's layer; the root package is __init__."""
    assert layer_of("clip_xai.studies.deletion_insertion") == layer_of("clip_xai.studies")
    assert layer_of("clip_xai.metrics.localisation.segmentation") == layer_of("clip_xai.metrics")
    assert layer_of("clip_xai.perf.timing") == 0 < layer_of("clip_xai.studies") < layer_of("clip_xai.perf.bench")
    assert layer_of("clip_xai") == layer_of("clip_xai.__main__") == len(LAYERS) - 1
    assert layer_of("clip_xai.nowhere") is None
    assert upward_edges({"clip_xai.models.randomise": {"clip_xai.config"}}) == [
        "clip_xai.models.randomise (models) -> clip_xai.config (config)"]


def test_every_module_is_in_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unplaced, "modules in no layer of LAYERS (add their room or module there): " + ", ".join(unplaced)


def test_no_import_runs_upward_between_layers():
    """Layers from the bottom: core modules, sinks, models, data, config, explainers, perturbations,
    metrics, studies, report and perf, api, the entrypoint. An upward import is a design error:
    move the helper it needs down (as config.sample_seed moved to seeds.py)."""
    bad = upward_edges({m: ts for m, ts in import_graph().items() if layer_of(m) is not None})
    assert not bad, "imports into a higher layer: " + "; ".join(bad)
