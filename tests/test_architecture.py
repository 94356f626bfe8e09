"""The package's layers: imports only go down, no import cycles, no hidden function-level imports.

Walks the AST of every module of ``cpsam_toolkit`` (no imports are executed). The layers are
defined here and described in ``docs/architecture.md``; a module may import modules of its own
layer or of lower layers. A new module must be given a layer below.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cpsam_toolkit"

#: lowest first; patterns are module names relative to the package ("" is the package itself)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("settings", "device", "_jit", "primitives", "io", "cellpose_files", "omezarr", "outputs",
              "preprocess", "tiling", "flows", "dynamics", "metrics", "network", "network.*")),
    ("core", ("core", "core.*")),
    ("modes", ("modes", "modes.*")),
    ("api", ("segment",)),
    ("apps", ("model_cache", "batch", "blockwise", "evaluate", "robustness", "training",
              "training.*")),
    ("facades", ("", "volume", "panoptic")),
    ("adapters", ("cli", "__main__", "commands", "commands.*", "widgets", "widgets.*",
                  "cellprofiler", "cellprofiler.*", "doctor")),
]

#: modules that import package modules inside functions, each for a reason that outweighs the
#: rule; the set may only shrink
FUNCTION_LEVEL_ALLOWED = {
    # the CellProfiler module (a link to cellprofiler_plugin/runcellposesam.py): CellProfiler
    # lists plugins without importing torch, so it imports the toolkit on first use only
    "cellprofiler.runcellposesam",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def layer_of(mod: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(mod, pat) if pat else mod == "" for pat in patterns):
            return i
    raise AssertionError(f"module cpsam_toolkit.{mod} has no layer: add it to LAYERS in {__file__}")


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Package-relative names of the package modules an import statement loads."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == "cpsam_toolkit" or a.name.startswith("cpsam_toolkit."):
                out.append(a.name[len("cpsam_toolkit."):] if "." in a.name else "")
        return out
    if node.level:
        base = mod.split(".") if mod else []
        if not is_pkg:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, *([node.module] if node.module else [])])
    elif node.module and (node.module == "cpsam_toolkit" or node.module.startswith("cpsam_toolkit.")):
        target = node.module[len("cpsam_toolkit."):] if "." in node.module else ""
    else:
        return out
    for a in node.names:  # `from pkg import submodule` loads the submodule
        sub = f"{target}.{a.name}" if target else a.name
        out.append(sub if sub in MODULES else target)
    return out


def _imports(mod: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at function level) of every package import; imports under
    ``if TYPE_CHECKING:`` are annotations only (never run) and are left out."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    skip: set[int] = set()
    for n in tree.body:  # imports directly inside top-level if/try blocks are module level
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skip |= {id(x) for x in ast.walk(n)}
        elif isinstance(n, (ast.If, ast.Try)):
            top |= {id(x) for x in ast.walk(n) if isinstance(x, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _resolve(mod, path.name == "__init__.py", node):
                found.append((target, node.lineno, id(node) not in top))
    return found


GRAPH = {m: sorted({t for t, _, _ in _imports(m) if t != m}) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_imports_only_go_down():
    bad = []
    for m in MODULES:
        for target, line, _ in _imports(m):
            if target in MODULES and layer_of(target) > layer_of(m):
                bad.append(f"cpsam_toolkit.{m} (layer {LAYERS[layer_of(m)][0]}) line {line} imports "
                           f"cpsam_toolkit.{target} (layer {LAYERS[layer_of(target)][0]})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package importing its own submodules (its __init__ re-exporting them) is not a cycle
    graph = {m: [t for t in ts if not (m == "" or t.startswith(m + ".") and m in _packages())]
             for m, ts in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(f"cpsam_toolkit.{m}" for m in c)
                                                     for c in cycles)


def _packages() -> set[str]:
    return {m for m, p in MODULES.items() if p.name == "__init__.py"}


def test_no_function_level_imports_of_own_modules():
    bad = []
    for m in MODULES:
        if m in FUNCTION_LEVEL_ALLOWED:
            continue
        bad += [f"cpsam_toolkit.{m} line {line} imports cpsam_toolkit.{t} inside a function"
                for t, line, inner in _imports(m) if inner]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_violations():
    """The checker itself: an upward import and a cycle are found."""
    assert _cycles({"a": ["b"], "b": ["a"], "c": ["a"]}) == [["a", "b"]]
    assert layer_of("core.predictor") < layer_of("modes.volume") < layer_of("segment")
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("brand_new_module")
