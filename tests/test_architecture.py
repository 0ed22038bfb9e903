"""The layers a newcomer reads in the folder tree hold in the code (docs/design.md).

Every import counts here, including the ones inside functions and under
``TYPE_CHECKING``: a lazy or type-only import that closes a circle still couples the
modules. SQL text is written only under ``store/``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvcache_cli"

# layer -> layers it must never import
FORBIDDEN = {
    "engine": {"store", "services", "cli", "server", "llm", "retrieval"},
    "retrieval": {"services", "cli", "server"},
    "store": {"services", "cli", "server", "llm"},
    "llm": {"store", "services", "cli", "server"},
    "services": {"cli", "server"},
    "server": {"cli"},
}
SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|DELETE\s+FROM|UPDATE\s+\w+\s+SET|CREATE\s+(TABLE|INDEX))\b", re.S
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
                elif target in modules:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FORBIDDEN) else "top"


def test_no_import_circles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == []


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{module} imports {dep}"
        for module, deps in sorted(_graph().items())
        for dep in sorted(deps)
        if _layer(dep) in FORBIDDEN.get(_layer(module), set())
    ]
    assert wrong == []


def test_only_the_store_writes_sql() -> None:
    outside = []
    for name, path in sorted(_modules().items()):
        if _layer(name) == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                outside.append(f"{name}:{node.lineno}")
    assert outside == []


def test_modules_stay_small() -> None:
    """About 600 lines at most; the exceptions are one thing each (docs/design.md says why)."""
    allowed = {"kvcache_cli.cli.render": 1000}
    big = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > allowed.get(name, 650)
    }
    assert big == {}
