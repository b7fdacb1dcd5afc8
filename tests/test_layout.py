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


def lua_names(script: str, table: str = "ARG_NAMES") -> list[str]:
    """The names a script reads its ARGV or KEYS into: its `local <table> = {...}` table."""
    source = (LUA / script).read_text(encoding="utf-8")
    start = source.index(f"local {table} = {{")
    body = source[start : source.index("}", start)]
    return [part.strip().strip("'") for part in body.split("{", 1)[1].split(",")]


@pytest.mark.parametrize(
    ("script", "names"),
    [
        ("admit.lua", "ADMIT_ARGS"),
        ("settle.lua", "SETTLE_ARGS"),
        ("renew.lua", "RENEW_ARGS"),
        ("hold.lua", "HOLD_ARGS"),
        ("held.lua", "HELD_ARGS"),
    ],
)
def test_each_script_reads_its_arguments_in_the_order_layout_builds_them(script: str, names: str) -> None:
    from proxy.limits import layout

    assert lua_names(script) == list(getattr(layout, names))
    source = (LUA / script).read_text(encoding="utf-8")
    body = source[source.index("local args = named(ARG_NAMES, ARGV)") :]
    # past the named ones, a script indexes ARGV only relative to them (a day's label or start, a
    # window budget's arguments, an alert threshold, a tag)
    refs = re.findall(r"ARGV\[[^\]]*\]", body)
    relative = ("ARGV[labels", "ARGV[at ", "ARGV[#ARG_NAMES ")
    assert all(ref == "ARGV[i]" or ref.startswith(relative) for ref in refs), refs


KEY_TABLES = {  # a script's KEYS tables and the layout.py names they follow
    "admit.lua": {
        "KEY_NAMES": "ADMIT_KEYS",
        "DAY_KEY_NAMES": "ADMIT_DAY_KEYS",
        "WINDOW_KEY_NAMES": "ADMIT_WINDOW_KEYS",
        "QUOTA_KEY_NAMES": "ADMIT_QUOTA_KEYS",
        "QUOTA_ARG_NAMES": "ADMIT_QUOTA_ARGS",
    },
    "settle.lua": {
        "KEY_NAMES": "SETTLE_KEYS",
        "WINDOW_KEY_NAMES": "SETTLE_WINDOW_KEYS",
        "QUOTA_KEY_NAMES": "SETTLE_QUOTA_KEYS",
        "QUOTA_ARG_NAMES": "SETTLE_QUOTA_ARGS",
    },
    "renew.lua": {
        "KEY_NAMES": "RENEW_KEYS",
        "WINDOW_KEY_NAMES": "RENEW_WINDOW_KEYS",
        "QUOTA_KEY_NAMES": "RENEW_QUOTA_KEYS",
    },
    "hold.lua": {"KEY_NAMES": "HOLD_KEYS"},
    "held.lua": {"KEY_NAMES": "HELD_KEYS"},
}


@pytest.mark.parametrize("script", sorted(KEY_TABLES))
def test_each_script_reads_its_keys_by_the_names_layout_builds_them_from(script: str) -> None:
    from proxy.limits import layout

    for table, names in KEY_TABLES[script].items():
        assert lua_names(script, table) == list(getattr(layout, names)), table
    source = (LUA / script).read_text(encoding="utf-8")
    # no key by position: the fixed keys are read into `K` by name, a variable section through
    # its helper (`day_budgets(d)`, `window_budget(w[, d])`), each a `named(..., KEYS, offset)`
    assert "KEYS[" not in source
    refs = re.findall(r".*\bKEYS\b.*", source)
    code = [ref for ref in refs if not ref.lstrip().startswith("--")]
    assert code and all("named(" in ref or "#KEYS - #KEY_NAMES" in ref for ref in code), code


def test_the_key_builders_put_each_key_under_its_name() -> None:
    from proxy.limits import layout
    from proxy.limits.types import (
        Admission,
        BudgetDay,
        QuotaLimits,
        Renewal,
        ScopeLimits,
        Settlement,
        Usage,
        WindowBudget,
    )

    k, t, u = ScopeLimits("key", "ci-bot"), ScopeLimits("team", "platform"), ScopeLimits("end_user", "u1")
    w = (WindowBudget("team", "platform", "week", 10), WindowBudget("org", "", "month", 10))
    first, second = "2026-12-06", "2026-12-07"  # a Sunday and a Monday: two weeks, one month
    days = BudgetDay((first, second), (0, 86_400, 172_800))
    account, deployment = QuotaLimits("openai", rpm=1), QuotaLimits("azure", "gpt-4o", max_parallel=1)
    q = ((account,), (account, deployment))
    a = Admission("r1", t, k, 0, 0, days, user=u, credential_id="c1", windows=w, quotas=q)
    s = Settlement("r1", t, k, "gpt-4o", second, Usage(), 0, user=u, windows=w, quotas=q)
    r = Renewal("r1", t, k, second, 1000, user=u, windows=w, quotas=q)
    p = "llmrl:{platform}"
    expected = {
        "key_requests": f"{p}:k:ci-bot:rq",
        "key_tokens": f"{p}:k:ci-bot:tk",
        "key_parallel": f"{p}:k:ci-bot:par",
        "team_requests": f"{p}:t:rq",
        "team_tokens": f"{p}:t:tk",
        "team_parallel": f"{p}:t:par",
        "user_requests": f"{p}:u:u1:rq",
        "user_tokens": f"{p}:u:u1:tk",
        "user_parallel": f"{p}:u:u1:par",
        "reservation": f"{p}:r:r1",
        "fence": f"{p}:x:c1",
        "settled_marker": f"{p}:d:r1",
        "ledger": f"{p}:ledger:{second}",
    }

    def day(label: str) -> dict[str, str]:
        return {
            "key_budget": f"{p}:k:ci-bot:b:{label}",
            "key_budget_holds": f"{p}:k:ci-bot:b:{label}:leases",
            "team_budget": f"{p}:t:b:{label}",
            "team_budget_holds": f"{p}:t:b:{label}:leases",
        }

    def window(i: int, label: str) -> dict[str, str]:
        budget = (f"{p}:t:w:2026-W{49 if label == first else 50}", "llmrl:{org}:w:2026-12")[i]
        return {"budget": budget, "holds": f"{budget}:leases"}

    admit = [expected[n] for n in layout.ADMIT_KEYS]
    admit += [day(label)[n] for label in (first, second) for n in layout.ADMIT_DAY_KEYS]
    admit += [window(i, label)[n] for i in (0, 1) for label in (first, second) for n in layout.ADMIT_WINDOW_KEYS]

    def quota(base: str) -> dict[str, str]:  # every team's: outside each team's slot
        return {"requests": f"{base}:rq", "tokens": f"{base}:tk", "parallel": f"{base}:par", "fair": f"{base}:fair"}

    openai, azure = quota("llmrl:{quota}:u:openai"), quota("llmrl:{quota}:u:azure:m:gpt-4o")
    scopes = (openai, openai, azure)  # each candidate's, in order
    admit += [scope[n] for scope in scopes for n in layout.ADMIT_QUOTA_KEYS]
    assert layout.Layout().admit_keys(a) == admit
    settle = [{**expected, **day(second)}[n] for n in layout.SETTLE_KEYS]
    settle += [window(i, second)[n] for i in (0, 1) for n in layout.SETTLE_WINDOW_KEYS]
    settle += [scope[n] for scope in scopes for n in layout.SETTLE_QUOTA_KEYS]
    assert layout.Layout().settle_keys(s) == settle
    renew = [{**expected, **day(second)}[n] for n in layout.RENEW_KEYS]
    renew += [window(i, second)[n] for i in (0, 1) for n in layout.RENEW_WINDOW_KEYS]
    renew += [azure["parallel"]]  # only a scope with max_parallel holds leases
    assert layout.Layout().renew_keys(r) == renew
    assert layout.admit_args(a, None)[-12:] == [1, 1, -1, -1, 2, 1, -1, -1, 2, -1, -1, 1]
    assert layout.settle_args(s, None, 1)[-6:] == [1, -1, 2, -1, 2, -1]


def test_without_upstream_quotas_an_admit_has_no_extra_key() -> None:
    """The hot path: no quota configured, nothing added but two zero counts."""
    from proxy.limits import layout
    from proxy.limits.types import Admission, BudgetDay, ScopeLimits

    a = Admission("r1", ScopeLimits("team", "t"), ScopeLimits("key", "k"), 0, 0, BudgetDay(("d",), (0, 1)))
    assert len(layout.Layout().admit_keys(a)) == len(layout.ADMIT_KEYS) + len(layout.ADMIT_DAY_KEYS)
    args = dict(zip(layout.ADMIT_ARGS, layout.admit_args(a, None), strict=False))
    assert (args["quota_count"], args["candidate_count"]) == (0, 0)


def test_what_the_scripts_share_is_written_once_in_the_prelude() -> None:
    from proxy.limits import layout, scripts

    prelude = (LUA / scripts.PRELUDE).read_text(encoding="utf-8")
    assert f"local UNLIMITED = {layout.UNLIMITED}\n" in prelude
    shared = re.findall(r"^local (?:function )?(\w+)", prelude, re.MULTILINE)
    assert {"UNLIMITED", "UNITS", "TTL_MARGIN_MS", "int", "named", "clock_ms", "refill", "reset_ms"} <= set(shared)
    for script in (scripts.ADMIT, scripts.SETTLE, scripts.RENEW):
        own = (LUA / script).read_text(encoding="utf-8")
        assert not [name for name in shared if re.search(rf"^local (function )?{name}\b", own, re.MULTILINE)], script
        assert "replicate_commands" not in own and "'TIME'" not in own
        # the prelude shares the script's first line: a line number in an error is the file's
        assembled = scripts.source(script)
        assert assembled.endswith(own) and len(assembled.splitlines()) == len(own.splitlines())


def test_the_prelude_refuses_a_line_it_cannot_join() -> None:
    from proxy.limits import scripts

    assert scripts.one_line("-- note\nlocal a = 1\n\n  local b = 2\n") == "local a = 1 local b = 2"
    with pytest.raises(ValueError, match="swallow"):
        scripts.one_line("local a = 1  -- one\nlocal b = 2\n")
    with pytest.raises(ValueError, match="swallow"):
        scripts.one_line("local a = [[\nx]]\n")
