"""No two modules of camcli/ import each other, directly or through others (issue 18, item 4).

Every import is read from the source with ``ast``: module-level and function-level alike, so a lazy
import that only hides a cycle is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import camcli

PACKAGE = Path(camcli.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The camcli modules ``path`` imports anywhere in its body (``from camcli import x`` counts
    x when x is a module, else the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (read by type checkers, never run)."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first search (empty when the graph has none)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_direct_and_indirect_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports_but_not_type_checking_ones(tmp_path: Path) -> None:
    src = tmp_path / "camcli"
    src.mkdir()
    f = src / "x.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import camcli.check\n"
                 "def f():\n    from camcli.pipeline import run_explain\n    from . import run\n    import camcli.feed\n")
    modules = {"camcli.x", "camcli.pipeline", "camcli.run", "camcli.feed", "camcli.check", "camcli"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, src
    try:
        assert imported(f, modules) == {"camcli.pipeline", "camcli.run", "camcli.feed", "camcli"}
    finally:
        PACKAGE = saved


def test_no_two_camcli_modules_import_each_other() -> None:
    graph = import_graph()
    assert graph["camcli.pipeline"] >= {"camcli.run", "camcli.local_runner", "camcli.ray_runner", "camcli.feed"}
    assert cycles(graph) == []
