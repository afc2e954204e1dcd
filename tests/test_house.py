"""The house rules of the package (issue 22), held by reading its source:
modules of at most 700 lines and functions of at most 60, imports of our
own modules only at the top of a module and never in a circle, and a
handler layer (ops.py and what it imports) with nothing of the FUSE layer
in it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shiftfs"
MODULES = sorted(PACKAGE.glob("*.py"))
FUSE_LAYER = {"session", "protocol", "negotiate", "libfuse", "daemon", "supervisor"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _own_imports(node: ast.AST) -> set[str]:
    """The modules of ours an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.level == 1:
        return {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shiftfs"):
        return {(node.module.split(".") + [""])[1] or node.names[0].name}
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("shiftfs.")}
    return set()


def _graph() -> dict[str, set[str]]:
    return {p.stem: set().union(*[_own_imports(n) for n in _tree(p).body] or [set()])
            for p in MODULES}


def test_the_rules_see_the_package():
    assert len(MODULES) > 20 and {"ops", "session", "cache", "caller"} <= {p.stem for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_a_module_is_at_most_700_lines(path):
    assert len(path.read_text().splitlines()) <= 700


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_a_function_is_at_most_60_lines(path):
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(_tree(path))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert long == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_our_modules_are_imported_at_the_top_only(path):
    inner = [f"line {s.lineno}: {sorted(_own_imports(s))}"
             for f in ast.walk(_tree(path)) if isinstance(f, (ast.FunctionDef, ast.ClassDef))
             for s in ast.walk(f) if _own_imports(s)]
    assert inner == []


def test_no_import_circles():
    graph = _graph()
    circles = []

    def visit(module, path):
        for nxt in sorted(graph.get(module, ())):
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(module)
    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_the_handlers_import_nothing_of_the_fuse_layer():
    graph = _graph()
    reached, todo = set(), ["ops"]
    while todo:
        module = todo.pop()
        for nxt in graph.get(module, ()):
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert reached & FUSE_LAYER == set()
    assert "cache" in reached and "caller" in reached  # the walk follows real imports


def test_the_client_api_loads_nothing_of_the_fuse_layer():
    """``from shiftfs import mount`` (a Python caller's import) loads the
    client API only: no serving code, no libfuse."""
    import subprocess
    import sys
    out = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom shiftfs import mount\n"
         "print(' '.join(sorted(m for m in sys.modules if m.startswith(('shiftfs', 'mfusepy')))))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent).stdout.split()
    assert "shiftfs.mount" in out
    assert {m.split(".")[-1] for m in out} & (FUSE_LAYER | {"mfusepy", "ops", "watch"}) == set()
