"""The package's shape, read from its source (AST), so that a change that breaks it fails here.

- Five layers, lowest first: kernels < ops < modules < patch < train. A module imports only its own layer or
  those below (function-level imports count: a lazy import is an edge all the same), never `sftfuse` itself (the
  lazy public API sits above every layer).
- No import cycle among sftfuse's modules, function-level imports included.
- A `<op>_triton.py` file is a leaf: it imports no sftfuse module but the registry and other Triton files.
- No source file over 450 lines, no function over 80 (the style guide's limits).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sftfuse"
LAYERS = ("kernels", "ops", "modules", "patch", "train")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """sftfuse modules that `path` (module `name`) imports anywhere in its body, resolved to known modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known and t.startswith("sftfuse"):
                found.add(t)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    src = _sources()
    return {name: _imports(path, name, set(src)) for name, path in src.items()}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_graph_is_read():
    """The reader finds real edges (a reader that found none would pass every other test here)."""
    g = _graph()
    assert "sftfuse.kernels.nf4" in g["sftfuse.ops.nf4"]
    assert "sftfuse.patch.families" in g["sftfuse.patch.swaps"]
    assert {_layer(n) for n in g} >= set(range(len(LAYERS)))


def test_no_upward_import():
    bad = []
    for name, deps in _graph().items():
        mine = _layer(name)
        for dep in deps:
            if dep == "sftfuse":
                bad.append(f"{name} imports the top-level sftfuse (the public API sits above every layer)")
            elif mine is not None and _layer(dep) is not None and _layer(dep) > mine:
                bad.append(f"{name} ({LAYERS[mine]}) imports {dep} ({LAYERS[_layer(dep)]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_triton_files_are_leaves():
    g = _graph()
    triton_files = [n for n in g if n.endswith("_triton")]
    assert triton_files
    for name in triton_files:
        extra = {d for d in g[name] if not d.endswith("_triton") and d != "sftfuse.kernels._registry"}
        assert not extra, f"{name} imports {sorted(extra)}: a Triton file holds only kernels and their configs"


@pytest.mark.parametrize("path", sorted([*PKG.rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
                                         *(ROOT / "bench").rglob("*.py")]), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_and_function_sizes(path):
    text = path.read_text()
    assert text.count("\n") <= 450, f"{path.name}: {text.count(chr(10))} lines (limit 450)"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"
