"""Calendar budget windows in `budget_timezone`: a day from midnight, a week from Monday 00:00, a
month from the 1st 00:00. Pure: the caller says which instant; DST-correct (a window starts at the
first instant whose local date is its first day, so a 23- or 25-hour day is one window).

The limiter hands the store *candidate* windows (previous, current, next around the replica's
clock) and the store picks the one containing its own clock, so replica clocks never decide the
window, only need to be right to within one window (`WindowCandidates.at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Window = Literal["day", "week", "month"]
WINDOWS: tuple[Window, ...] = ("day", "week", "month")
ADJECTIVES: dict[Window, str] = {"day": "daily", "week": "weekly", "month": "monthly"}


@dataclass(frozen=True, slots=True)
class CalendarWindow:
    """One window: [start, end) in epoch seconds; `label` is "2026-12-01", "2026-W49" or "2026-12"."""

    window: Window
    label: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class WindowCandidates:
    """Consecutive windows: window i spans [starts[i], starts[i+1]) (one more start than labels)."""

    window: Window
    labels: tuple[str, ...]
    starts: tuple[int, ...]

    def at(self, now_s: float) -> CalendarWindow:
        """The candidate containing `now_s` as the store chooses it: the last one that has started
        (the first candidate when none has)."""
        index = 0
        for i, start in enumerate(self.starts[:-1]):
            if now_s >= start:
                index = i
        return CalendarWindow(self.window, self.labels[index], self.starts[index], self.starts[index + 1])


def _first_day(window: Window, day: date) -> date:
    if window == "day":
        return day
    if window == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _shift(window: Window, first: date, by: int) -> date:
    """The first day of the window `by` windows after the one starting on `first`."""
    if window == "day":
        return first + timedelta(days=by)
    if window == "week":
        return first + timedelta(weeks=by)
    months = first.year * 12 + first.month - 1 + by
    return date(months // 12, months % 12 + 1, 1)


def _label(window: Window, first: date) -> str:
    if window == "day":
        return first.isoformat()
    if window == "week":
        year, week, _ = first.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{first.year:04d}-{first.month:02d}"


def label_of_day(window: Window, day: str) -> str:
    """The label of the `window` containing the day labelled `day` ("2026-12-01")."""
    return _label(window, _first_day(window, date.fromisoformat(day)))


def days_of(window: Window, day: str, until: str | None = None) -> list[str]:
    """The days ("YYYY-MM-DD") of the `window` containing `day`, up to `until` if it ends later."""
    first = _first_day(window, date.fromisoformat(day))
    last = _shift(window, first, 1) - timedelta(days=1)
    if until is not None:
        last = min(last, date.fromisoformat(until))
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def _start(day: date, zone: ZoneInfo) -> int:
    """The first instant of `day` in `zone`. A midnight skipped by DST resolves (fold=0, the
    offset before the change) to the instant of the change: still the day's first instant."""
    return int(datetime.combine(day, time(0), tzinfo=zone).timestamp())


def _local_day(zone: ZoneInfo, now: datetime | float) -> date:
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise ValueError("a naive datetime: give an aware one or epoch seconds")
        return now.astimezone(zone).date()
    return datetime.fromtimestamp(now, zone).date()


def window_at(window: Window, zone: ZoneInfo, now: datetime | float) -> CalendarWindow:
    """The `window` containing `now` (an aware datetime or epoch seconds) in `zone`."""
    first = _first_day(window, _local_day(zone, now))
    return CalendarWindow(window, _label(window, first), _start(first, zone), _start(_shift(window, first, 1), zone))


def end_of(window: Window, day: str, zone: ZoneInfo) -> int:
    """When the `window` containing the day labelled `day` ends in `zone` (epoch seconds)."""
    return _start(_shift(window, _first_day(window, date.fromisoformat(day)), 1), zone)


def candidate_windows(window: Window, zone: ZoneInfo, now: datetime | float) -> WindowCandidates:
    """The previous, current and next `window` around `now` (the replica's clock)."""
    first = _first_day(window, _local_day(zone, now))
    firsts = [_shift(window, first, offset) for offset in (-1, 0, 1, 2)]
    return WindowCandidates(
        window, tuple(_label(window, day) for day in firsts[:3]), tuple(_start(day, zone) for day in firsts)
    )
