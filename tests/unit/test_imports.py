"""The package's import graph: no module imports itself back through others (also not through an import inside a
function), and imports inside functions stay the exception (an optional dependency, or a cost the config check
must not pay), not the way modules reach each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "clipkit"
MAX_DEFERRED = 40  # 37 on 2026-12-05: optional dependencies (~25), the CLI's verbs, config-time checks, engines


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> tuple[set[str], int]:
    """The clipkit modules ``name`` imports (anywhere but under ``if TYPE_CHECKING``), and its deferred imports."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for stmt in tree.body
        if isinstance(stmt, ast.If) and getattr(stmt.test, "id", "") == "TYPE_CHECKING"
        for node in ast.walk(stmt)
    }
    top = {id(stmt) for stmt in tree.body}
    targets, deferred = set(), 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in typing_only:
            continue
        deferred += id(node) not in top
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
            continue
        base = node.module or ""
        if node.level:  # (relative imports: none in clipkit today)
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            base = ".".join([package.rsplit(".", node.level - 1)[0], base]).strip(".")
        subs = {f"{base}.{a.name}" for a in node.names}
        targets |= subs if subs <= modules.keys() else subs | {base}
    return {t for t in targets if t in modules and t != name}, deferred


def test_no_module_imports_itself_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules)[0] for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_stay_few():
    modules = _modules()
    deferred = sum(_imports(name, path, modules)[1] for name, path in modules.items())
    assert deferred <= MAX_DEFERRED, f"{deferred} imports inside functions: import at the top of the module"
