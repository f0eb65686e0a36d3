"""The package's shape: no import cycles (function-level imports included) and no function
longer than the project allows without a comment saying why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("itk_infer", "itk_infer_assets")
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"  # on the line above a def: why this function stays long


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its file (any nesting level)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "itk_infer.runner" in graph and "itk_infer.workers" in graph["itk_infer.runner"]
    assert find_cycle(graph) is None


def test_cycle_finder_sees_a_deferred_import_cycle(tmp_path: Path) -> None:
    # The runner <-> workers cycle this test guards against: workers imported runner at the
    # top, runner imported workers inside a function.
    graph = {"a.runner": {"a.workers"}, "a.workers": {"a.runner"}, "a.cli": {"a.runner"}}
    assert find_cycle(graph) == ["a.runner", "a.workers", "a.runner"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    nested = tmp_path / "m.py"
    nested.write_text("def f():\n    from itk_infer import runner\n")
    assert _imports(nested, "itk_infer.m", {"itk_infer.runner": nested}) == {"itk_infer.runner"}


def long_functions() -> list[str]:
    """Functions over the limit whose def has no ``# long:`` comment above it."""
    found = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            marked = first >= 2 and LONG_MARK in lines[first - 2]
            if length > MAX_FUNCTION_LINES and not marked:
                found.append(f"{name}.{node.name}: {length} lines")
    return found


def test_no_long_functions() -> None:
    assert long_functions() == []


def test_readme_settings_table_is_the_schema() -> None:
    from itk_infer.config import settings_table

    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- settings:start")
    block = text[text.index("\n", start) + 1 : text.index("<!-- settings:end -->")]
    assert block.strip() == settings_table()


def test_public_names_resolve() -> None:
    import itk_infer

    missing = [name for name in itk_infer.__all__ if not hasattr(itk_infer, name)]
    assert missing == []
