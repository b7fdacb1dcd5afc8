"""Budget days in `budget_timezone`, handed to the store as candidate boundaries.

The store picks the candidate containing its own clock, so the replicas' clocks only need to
be right to within a day for the right day to be chosen.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from .types import BudgetDay


def _start(day: date, zone: ZoneInfo) -> int:
    return int(datetime.combine(day, time(0), tzinfo=zone).timestamp())


def candidate_days(zone: ZoneInfo, now: datetime | None = None) -> BudgetDay:
    today = (now or datetime.now(zone)).astimezone(zone).date()
    days = [today + timedelta(days=offset) for offset in (-1, 0, 1)]
    starts = [_start(day, zone) for day in days] + [_start(today + timedelta(days=2), zone)]
    return BudgetDay(labels=tuple(day.isoformat() for day in days), starts=tuple(starts))


def day_label(zone: ZoneInfo, now: datetime | None = None) -> str:
    return (now or datetime.now(zone)).astimezone(zone).date().isoformat()
