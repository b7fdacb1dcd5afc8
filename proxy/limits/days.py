"""Budget days in `budget_timezone`: the one place that says which day it is.

Admission hands the store candidate day boundaries and the store picks the candidate containing
its own clock, so the replicas' clocks only need to be right to within a day for the right day
to be chosen. `BudgetCalendar` serves both the limiter (the candidates) and everything that
asks for "today" (the budget gauges, the admin API's default date, `llm-proxy usage`).
"""

from __future__ import annotations

import time as time_module
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from ..budgets.windows import Window, end_of
from .types import BudgetDay

DAY_EDGE_S = 3600  # this close to midnight, admission offers the store three candidate days


def _start(day: date, zone: ZoneInfo) -> int:
    return int(datetime.combine(day, time(0), tzinfo=zone).timestamp())


def candidate_days(zone: ZoneInfo, now: datetime | None = None) -> BudgetDay:
    """Yesterday, today and tomorrow around `now` in `zone`, with the start of the day after."""
    today = (now or datetime.now(zone)).astimezone(zone).date()
    days = [today + timedelta(days=offset) for offset in (-1, 0, 1)]
    starts = [_start(day, zone) for day in days] + [_start(today + timedelta(days=2), zone)]
    return BudgetDay(labels=tuple(day.isoformat() for day in days), starts=tuple(starts))


class BudgetCalendar:
    """The budget days of the running `budget_timezone` by one clock.

    `timezone` is read on every call (a reload may change it); `clock_us` is the store's test
    clock, or None for the system clock (the store's own clock decides the day in Redis anyway).
    """

    def __init__(self, timezone: Callable[[], str], clock_us: Callable[[], int] | None = None) -> None:
        self._timezone = timezone
        self._clock_us = clock_us
        self._zone_name = ""
        self._zone = ZoneInfo("UTC")
        self._days: BudgetDay | None = None
        self._today_only: BudgetDay | None = None

    def now_s(self) -> float:
        return self._clock_us() / 1e6 if self._clock_us is not None else time_module.time()

    def _around(self, now: float) -> tuple[BudgetDay, BudgetDay]:
        name = self._timezone()
        if name != self._zone_name:
            self._zone_name, self._zone, self._days = name, ZoneInfo(name), None
        days, today_only = self._days, self._today_only
        if days is None or today_only is None or not days.starts[1] <= now < days.starts[2]:
            days = self._days = candidate_days(self._zone, datetime.fromtimestamp(now, self._zone))
            today_only = self._today_only = BudgetDay(days.labels[1:2], days.starts[1:3])
        return days, today_only

    def candidates(self) -> BudgetDay:
        """The days admission offers the store. Within an hour of midnight: yesterday, today and
        tomorrow, so a replica whose clock is a little off still lets the store choose. Otherwise
        today alone, which spares the admit script eight keys."""
        now = self.now_s()
        days, today_only = self._around(now)
        if days.starts[1] + DAY_EDGE_S <= now < days.starts[2] - DAY_EDGE_S:
            return today_only
        return days

    def window_end(self, window: Window, day: str) -> int:
        """When the `window` containing the day labelled `day` ends (epoch seconds)."""
        self._around(self.now_s())
        return end_of(window, day, self._zone)

    def today(self) -> str:
        """Today's label, `YYYY-MM-DD`."""
        return self._around(self.now_s())[0].labels[1]

    def today_bounds(self) -> tuple[str, int, int]:
        """Today's label with its start and end (epoch seconds)."""
        days = self._around(self.now_s())[0]
        return days.labels[1], days.starts[1], days.starts[2]
