"""`llm-proxy usage`: the day's spend as a table or JSON, from the store or a running proxy."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import httpx
import orjson

from ..budgets.windows import Window
from ..config import Config
from ..errors import StoreError
from ..usage.report import rows, usage_overview
from ..usage.window import window_usage
from .config_file import config_path, load_or_exit

COLUMNS = {  # one per `report.GROUPINGS`
    "team": ["team"],
    "key": ["team", "key"],
    "model": ["team", "key", "model"],
    "tag": ["team", "tag"],
    "end_user": ["team", "end_user"],
}
NUMBERS = [
    "spend_usd",
    "budget_usd",
    "remaining_usd",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
]


async def _from_store(config: Config, day: str | None, window: Window) -> dict[str, Any]:
    from ..app import build_store
    from ..limits.days import BudgetCalendar

    store = build_store(config)
    try:
        today = BudgetCalendar(lambda: config.budget_timezone, store.clock_us).today()
        return usage_overview(config, await window_usage(store, list(config.teams), day or today, window, today))
    finally:
        await store.close()


def _from_url(url: str, admin_key: str, day: str | None, window: Window) -> dict[str, Any]:
    params = {"date": day, "window": window} if day else {"window": window}
    try:
        response = httpx.get(
            url.rstrip("/") + "/admin/usage",
            params=params,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        raise SystemExit(f"llm-proxy usage: cannot reach {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else None
        detail = error.get("message") if isinstance(error, dict) else "not an llm-proxy usage answer"
        raise SystemExit(f"llm-proxy usage: {url} answered {response.status_code}: {detail}")
    return body


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def table(overview: dict[str, Any], by: str) -> str:
    columns = COLUMNS[by] + [n for n in NUMBERS if by in ("team", "key") or not n.startswith(("budget", "remaining"))]
    body = [[_cell(row.get(c)) for c in columns] for row in rows(overview, by)]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = [
        f"usage {'in' if len(overview['date']) < 10 else 'on'} {overview['date']} (USD), by {by}",
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    total = overview["total"]
    lines.append(
        f"total: ${total['spend_usd']:.6f}, {total['requests']} requests, "
        f"{total['prompt_tokens']} prompt + {total['completion_tokens']} completion tokens"
    )
    return "\n".join(lines)


def run_usage(args: argparse.Namespace) -> int:
    if args.url:
        admin_key = os.environ.get(args.admin_key_env)
        if not admin_key:
            print(f"llm-proxy usage: set {args.admin_key_env} to the admin key", file=sys.stderr)
            return 1
        overview = _from_url(args.url, admin_key, args.date, args.window)
    else:
        config = load_or_exit(config_path(args.config))
        if config.store.redis_url is None:
            print(
                "llm-proxy usage: no shared ledger: the config has no store.redis_url, and the in-process "
                "store keeps usage inside the serving process (ask it with --url)",
                file=sys.stderr,
            )
            return 1
        try:
            overview = asyncio.run(_from_store(config, args.date, args.window))
        except StoreError as exc:
            print(f"llm-proxy usage: Redis did not answer: {exc}", file=sys.stderr)
            return 1
    if args.json:
        sys.stdout.write(orjson.dumps(overview, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(table(overview, args.by))
    return 0
