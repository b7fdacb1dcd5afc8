"""`llm-proxy usage --what-if PRICES.yaml [--month YYYY-MM]`: the month's ledger, re-priced.

Reads the month's daily ledgers (from the store, or a running proxy's /admin/usage with --url),
sums them per model and prints `proxy.pricing.what_if.reprice`'s rows: today's booked cost beside each
alternative's.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import os
import re
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from ..config import Config
from ..errors import ConfigError, StoreError
from ..pricing.what_if import (
    Alternative,
    WhatIfRow,
    catalog_prices,
    ledger_models,
    load_alternatives,
    reprice,
    what_if_table,
)
from .config_file import config_path, load_or_exit


def month_days(month: str) -> list[str]:
    """`"2026-11"` -> every day of November 2026 as YYYY-MM-DD; ValueError for anything else."""
    if not re.fullmatch(r"\d{4}-\d{2}", month):
        raise ValueError(month)
    first = date.fromisoformat(month + "-01")
    count = calendar.monthrange(first.year, first.month)[1]
    return [first.replace(day=day).isoformat() for day in range(1, count + 1)]


async def _reports_from_store(config: Config, days: list[str]) -> list[dict[str, Any]]:
    from ..app import build_store

    store = build_store(config)
    try:
        return [await store.usage(day, list(config.teams)) for day in days]
    finally:
        await store.close()


def _as_json(month: str, rows: list[WhatIfRow], alternatives: list[Alternative]) -> dict[str, Any]:
    return {
        "month": month,
        "alternatives": [alternative.name for alternative in alternatives],
        "rows": [
            {
                "model": row.model,
                "tokens": {
                    name: getattr(row.usage, name)
                    for name in ("input", "cached_input", "cache_write", "output", "reasoning")
                },
                "today_micros": row.today_micros,
                "costs_micros": {
                    alternative.name: cost for alternative, cost in zip(alternatives, row.costs, strict=True)
                },
            }
            for row in rows
        ],
    }


def run_what_if(args: argparse.Namespace) -> int:
    try:
        alternatives = load_alternatives(Path(args.what_if).read_text(encoding="utf-8"))
    except OSError as exc:
        print(f"llm-proxy usage: {args.what_if}: {exc.strerror}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"{args.what_if}: invalid prices file", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.url:
        from .usage import _from_url

        admin_key = os.environ.get(args.admin_key_env)
        if not admin_key:
            print(f"llm-proxy usage: set {args.admin_key_env} to the admin key", file=sys.stderr)
            return 1
        month = args.month or datetime.now(ZoneInfo("UTC")).strftime("%Y-%m")
        days = _days_or_exit(month)
        reports = [_from_url(args.url, admin_key, day, "day") for day in days]
    else:
        config = load_or_exit(config_path(args.config))
        if config.store.redis_url is None:
            print(
                "llm-proxy usage: no shared ledger: the config has no store.redis_url (ask a running proxy with --url)",
                file=sys.stderr,
            )
            return 1
        month = args.month or datetime.now(ZoneInfo(config.budget_timezone)).strftime("%Y-%m")
        days = _days_or_exit(month)
        try:
            reports = asyncio.run(_reports_from_store(config, days))
        except StoreError as exc:
            print(f"llm-proxy usage: Redis did not answer: {exc}", file=sys.stderr)
            return 1
    rows = reprice(ledger_models(reports), alternatives, catalog_prices())
    if args.json:
        sys.stdout.write(orjson.dumps(_as_json(month, rows, alternatives), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(what_if_table(rows, alternatives, month))
    return 0


def _days_or_exit(month: str) -> list[str]:
    try:
        return month_days(month)
    except ValueError:
        raise SystemExit(f"llm-proxy usage: --month {month!r}: expected YYYY-MM") from None
