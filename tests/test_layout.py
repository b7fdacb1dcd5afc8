"""The module graph: every module imports, no import cycle (lazy and type-checking imports
included), and the store layer answers with decisions, never with the HTTP error layer."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The proxy modules `name` imports, anywhere in its source (a function's lazy import too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "proxy.__main__"))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_there_is_no_import_cycle() -> None:
    """Depth-first search over the graph; a back edge is a cycle, reported as its path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(GRAPH[name]):
            if child.startswith(name + "."):  # a package importing its own submodule is no cycle
                continue
            if state.get(child) == 1:
                cycles.append([*path[path.index(child) :], child] if child in path else [*path, child])
            elif child not in state:
                visit(child, [*path, child])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_sees_a_lazy_import(tmp_path: Path) -> None:
    """The check itself can fail: a function-level import back to its importer is found."""
    (tmp_path / "proxy").mkdir()
    first, second = tmp_path / "proxy" / "a.py", tmp_path / "proxy" / "b.py"
    first.write_text("from . import b\n")
    second.write_text("def f():\n    from .a import x\n")
    global MODULES
    saved = MODULES
    MODULES = {"proxy.a": first, "proxy.b": second}
    try:
        assert imported("proxy.b", second) == {"proxy.a"}
        assert imported("proxy.a", first) == {"proxy.b"}
    finally:
        MODULES = saved


def test_the_store_layer_answers_with_decisions_not_http_errors() -> None:
    """proxy.limits returns Tickets and Refusals: it imports no ProxyError and nothing of the
    request path or the HTTP layer."""
    import proxy.errors

    http_errors = {
        name
        for name, value in vars(proxy.errors).items()
        if isinstance(value, type) and issubclass(value, proxy.errors.ProxyError)
    }
    found = []
    for name, path in MODULES.items():
        if not name.startswith("proxy.limits"):
            continue
        found += [
            f"{name} imports {target}"
            for target in GRAPH[name]
            if target.startswith(("proxy.request", "proxy.http", "proxy.app", "proxy.gateway"))
        ]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("errors"):
                found += [f"{name} imports {alias.name}" for alias in node.names if alias.name in http_errors]
    assert not found, found


LUA = PACKAGE / "limits" / "lua"


def lua_arg_names(script: str) -> list[str]:
    """The names a script reads its ARGV into: its `local ARG_NAMES = {...}` table."""
    source = (LUA / script).read_text(encoding="utf-8")
    start = source.index("local ARG_NAMES = {")
    table = source[start : source.index("}", start)]
    return [part.strip().strip("'") for part in table.split("{", 1)[1].split(",")]


@pytest.mark.parametrize(
    ("script", "names"), [("admit.lua", "ADMIT_ARGS"), ("settle.lua", "SETTLE_ARGS"), ("renew.lua", "RENEW_ARGS")]
)
def test_each_script_reads_its_arguments_in_the_order_layout_builds_them(script: str, names: str) -> None:
    from proxy.limits import layout

    assert lua_arg_names(script) == list(getattr(layout, names))
    source = (LUA / script).read_text(encoding="utf-8")
    assert "UNLIMITED" not in source or f"local UNLIMITED = {layout.UNLIMITED}" in source
    body = source[source.index("for i, name in ipairs(ARG_NAMES)") :]
    # past the named ones, a script indexes ARGV only relative to them (a day's label or start, a
    # window budget's arguments, an alert threshold, a tag)
    refs = re.findall(r"ARGV\[[^\]]*\]", body)
    relative = ("ARGV[labels", "ARGV[at ", "ARGV[#ARG_NAMES ")
    assert all(ref == "ARGV[i]" or ref.startswith(relative) for ref in refs), refs
