"""The converter's modules import each other in one direction only: no cycle, not even one
hidden behind an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import alpaca_convert

PACKAGE = alpaca_convert.__name__
FOLDER = Path(alpaca_convert.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Modules of this package that `path` imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found |= {alias.name for alias in node.names}
            elif node.level == 0 and (node.module or "").startswith(PACKAGE + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith(PACKAGE + ".")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in FOLDER.glob("*.py")}
    graph = {p.stem: imported_modules(p) & modules for p in FOLDER.glob("*.py")}
    graph["__init__"] = set()  # importing any submodule runs it first; it only re-exports
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_converter_modules_import_without_cycles() -> None:
    graph = import_graph()
    assert {"source", "detect", "hf_layout", "sources_hf", "lora"} <= graph.keys()
    assert "detect" in graph["converter"]  # the graph does see relative imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_shared_helpers_sit_below_their_users() -> None:
    """The abstract Source and the HF layout helpers import no reader; LoRA no HF reader."""
    graph = import_graph()
    readers = {"sources_hf", "sources_meta", "sources_gguf", "detect"}
    assert not graph["source"] & readers
    assert not graph["hf_layout"] & readers
    assert not graph["lora"] & readers
