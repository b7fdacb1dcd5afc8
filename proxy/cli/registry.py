"""`llm-proxy keys ...` and `llm-proxy teams ...`: the admin API of a running proxy (`--url`), with
the admin key from `LLM_PROXY_ADMIN_KEY`. Tables by default, `--json` for scripts. A failure is
one line on stderr (the proxy's own error message) and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import orjson

ADMIN_KEY_ENV = "LLM_PROXY_ADMIN_KEY"
URL_ENV = "LLM_PROXY_URL"
DEFAULT_URL = "http://127.0.0.1:8080"
LIMIT_OPTIONS = ("rpm", "tpm", "max_parallel", "max_wait_ms")


class CliError(Exception):
    """One line for stderr."""


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    admin_key = os.environ.get(ADMIN_KEY_ENV)
    if not admin_key:
        raise CliError(f"set {ADMIN_KEY_ENV} to an admin key")
    url = args.url.rstrip("/")
    import httpx  # here, not at the top: every `llm-proxy` command, `serve` too, builds this parser (~60 ms)

    try:
        response = httpx.request(
            method, url + path, json=body, headers={"Authorization": f"Bearer {admin_key}"}, timeout=10
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from None
    try:
        reply = response.json()
    except ValueError:
        reply = None
    if response.status_code >= 400 or not isinstance(reply, dict):
        error = reply.get("error") if isinstance(reply, dict) else None
        detail = error.get("message") if isinstance(error, dict) else "not an llm-proxy answer"
        code = f" ({error['code']})" if isinstance(error, dict) and error.get("code") else ""
        raise CliError(f"{url} answered {response.status_code}{code}: {detail}")
    return reply


# -- building request bodies from options ---------------------------------------------------------
def _limits(args: argparse.Namespace) -> dict[str, int] | None:
    given = {name: getattr(args, name) for name in LIMIT_OPTIONS if getattr(args, name) is not None}
    return given or None


def _fields(args: argparse.Namespace, *, key: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if (limits := _limits(args)) is not None:
        body["limits"] = limits
    if args.daily_usd is not None:
        body["budgets"] = {"daily_usd": args.daily_usd}
    if args.meta:
        body["metadata"] = dict(item.partition("=")[::2] for item in args.meta)
    queue = ("priority",) if key else ("share", "max_queue")
    body |= {name: getattr(args, name) for name in queue if getattr(args, name) is not None}
    if key:
        if args.models is not None:
            body["models"] = [m for m in args.models.split(",") if m]
        if args.expires_at is not None:
            body["expires_at"] = args.expires_at
    return body


# -- printing -------------------------------------------------------------------------------------
def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v is not None and k != "enforce") or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _budget(entry: dict[str, Any]) -> object:
    budgets = entry.get("budgets")
    if isinstance(budgets, dict):
        return budgets.get("daily_usd")
    return entry.get("daily_budget_usd")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(_budget(row) if c == "daily_usd" else row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


KEY_COLUMNS = ["name", "team", "source", "limits", "daily_usd", "models", "expires_at", "priority"]
TEAM_COLUMNS = ["name", "source", "limits", "daily_usd", "share", "max_queue"]


def _show(args: argparse.Namespace, reply: Any, columns: list[str]) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    rows = reply if isinstance(reply, list) else [reply]
    print(_table(rows, columns))
    if isinstance(reply, dict) and "key" in reply:
        print(f"key: {reply['key']}   # shown this once; only its sha256 is stored")


# -- commands -------------------------------------------------------------------------------------
def run_keys(args: argparse.Namespace) -> Any:
    action, name = args.action, getattr(args, "name", None)
    if action == "list":
        listing = _request(args, "GET", "/admin/keys")["keys"]
        rows = [{"name": n, **k} for n, k in sorted(listing.items()) if args.team in (None, k.get("team"))]
        return rows, KEY_COLUMNS
    if action == "create":
        body = {"name": name, "team": args.team, **_fields(args, key=True)}
        return _request(args, "POST", "/admin/keys", body), KEY_COLUMNS
    if action == "show":
        return _request(args, "GET", f"/admin/keys/{name}"), KEY_COLUMNS
    if action == "update":
        return _request(args, "PATCH", f"/admin/keys/{name}", _fields(args, key=True)), KEY_COLUMNS
    if action == "rotate":
        return _request(args, "POST", f"/admin/keys/{name}/rotate", {"grace_s": args.grace_s}), KEY_COLUMNS
    return _request(args, "DELETE", f"/admin/keys/{name}"), ["name", "revoked"]


def run_teams(args: argparse.Namespace) -> Any:
    action, name = args.action, getattr(args, "name", None)
    if action == "list":
        return _request(args, "GET", "/admin/teams")["data"], TEAM_COLUMNS
    if action == "create":
        return _request(args, "POST", "/admin/teams", {"name": name, **_fields(args, key=False)}), TEAM_COLUMNS
    if action == "show":
        return _request(args, "GET", f"/admin/teams/{name}"), TEAM_COLUMNS
    if action == "update":
        return _request(args, "PATCH", f"/admin/teams/{name}", _fields(args, key=False)), TEAM_COLUMNS
    return _request(args, "DELETE", f"/admin/teams/{name}"), ["name", "deleted"]


def run(args: argparse.Namespace) -> int:
    try:
        reply, columns = (run_keys if args.command == "keys" else run_teams)(args)
    except CliError as exc:
        print(f"llm-proxy {args.command} {args.action}: {exc}", file=sys.stderr)
        return 1
    _show(args, reply, columns)
    return 0


def add_parsers(commands: Any) -> None:
    """`keys` and `teams` under the `llm-proxy` parser's subcommands."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL), help=f"default: ${URL_ENV}")
        parser.add_argument("--json", action="store_true")

    def settings(parser: argparse.ArgumentParser, *, key: bool) -> None:
        for name in LIMIT_OPTIONS:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
        parser.add_argument("--daily-usd", help="daily budget in USD")
        parser.add_argument("--meta", action="append", metavar="K=V", help="metadata (repeatable)")
        if not key:
            parser.add_argument("--share", type=float, help="its weight when teams wait for the same capacity")
            parser.add_argument("--max-queue", dest="max_queue", type=int, help="its waiters per replica")
        if key:
            parser.add_argument("--priority", choices=("high", "normal", "low"), help="its class in the queue")
            parser.add_argument("--models", help="allowed models, comma-separated")
            parser.add_argument("--expires-at", help="ISO 8601 with a timezone, e.g. 2027-01-01T00:00:00Z")

    for kind in ("keys", "teams"):
        parser = commands.add_parser(kind, help=f"manage runtime {kind} of a running proxy (admin API)")
        actions = parser.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list")
        common(listing)
        if kind == "keys":
            listing.add_argument("--team")
        for action in ("create", "show", "update", "rotate" if kind == "keys" else "delete"):
            sub = actions.add_parser(action)
            sub.add_argument("name")
            common(sub)
            if action in ("create", "update"):
                settings(sub, key=kind == "keys")
            if action == "create" and kind == "keys":
                sub.add_argument("--team", required=True)
            if action == "rotate":
                sub.add_argument("--grace-s", type=int, default=0, help="seconds the old key keeps working")
        if kind == "keys":
            revoke = actions.add_parser("revoke")
            revoke.add_argument("name")
            common(revoke)
        parser.set_defaults(func=run)
