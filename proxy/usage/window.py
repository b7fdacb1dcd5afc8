"""The ledger over a budget window: a week's or month's usage is the sum of its days' ledgers."""

from __future__ import annotations

import asyncio
from typing import Any

from ..budgets.windows import Window, days_of, label_of_day
from ..limits.ledger import merged
from ..limits.types import Store


async def window_usage(store: Store, teams: list[str], day: str, window: Window, today: str) -> dict[str, Any]:
    """The `usage()` report of the `window` containing `day` (its days up to `today`), its `date`
    the window's label ("2026-W49", "2026-12"); a day window is that day's report."""
    if window == "day":
        return await store.usage(day, teams)
    days = days_of(window, day, until=max(today, day))
    reports = await asyncio.gather(*(store.usage(d, teams) for d in days))
    return merged(list(reports), label_of_day(window, day))
