"""Calendar budget windows: day, week (Monday), month (the 1st) in any time zone, DST-correct, and
the candidate windows the store chooses from with its own clock."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from proxy.budgets.windows import WINDOWS, CalendarWindow, Window, candidate_windows, window_at

UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
SANTIAGO = ZoneInfo("America/Santiago")  # DST starts at midnight: 2026-09-06 00:00 does not exist
TOKYO = ZoneInfo("Asia/Tokyo")


def _epoch(zone: ZoneInfo, *parts: int) -> int:
    return int(datetime(*parts, tzinfo=zone).timestamp())  # type: ignore[misc]


@pytest.mark.parametrize(
    ("window", "zone", "now", "label", "start", "end"),
    [
        (
            "day",
            UTC_ZONE,
            datetime(2026, 12, 1, 21, 57, tzinfo=UTC),
            "2026-12-01",
            _epoch(UTC_ZONE, 2026, 12, 1),
            _epoch(UTC_ZONE, 2026, 12, 2),
        ),
        # Tokyo is already on the 2nd at 21:57 UTC on the 1st
        (
            "day",
            TOKYO,
            datetime(2026, 12, 1, 21, 57, tzinfo=UTC),
            "2026-12-02",
            _epoch(TOKYO, 2026, 12, 2),
            _epoch(TOKYO, 2026, 12, 3),
        ),
        # 2026-12-01 is a Tuesday: the week began on Monday 2026-11-30 (ISO week 49)
        (
            "week",
            UTC_ZONE,
            datetime(2026, 12, 1, 12, tzinfo=UTC),
            "2026-W49",
            _epoch(UTC_ZONE, 2026, 11, 30),
            _epoch(UTC_ZONE, 2026, 12, 7),
        ),
        # a week across the new year keeps the ISO year of its Monday: 2026-12-28 is week 53 of 2026
        (
            "week",
            UTC_ZONE,
            datetime(2027, 1, 1, tzinfo=UTC),
            "2026-W53",
            _epoch(UTC_ZONE, 2026, 12, 28),
            _epoch(UTC_ZONE, 2027, 1, 4),
        ),
        (
            "month",
            UTC_ZONE,
            datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC),
            "2026-12",
            _epoch(UTC_ZONE, 2026, 12, 1),
            _epoch(UTC_ZONE, 2027, 1, 1),
        ),
        (
            "month",
            UTC_ZONE,
            datetime(2027, 1, 1, tzinfo=UTC),
            "2027-01",
            _epoch(UTC_ZONE, 2027, 1, 1),
            _epoch(UTC_ZONE, 2027, 2, 1),
        ),
        (
            "month",
            UTC_ZONE,
            datetime(2028, 2, 29, 12, tzinfo=UTC),
            "2028-02",
            _epoch(UTC_ZONE, 2028, 2, 1),
            _epoch(UTC_ZONE, 2028, 3, 1),
        ),
        # Berlin, spring forward on Sunday 2026-03-29: a 23-hour day, and its week is 167 hours
        (
            "day",
            BERLIN,
            datetime(2026, 3, 29, 12, tzinfo=BERLIN),
            "2026-03-29",
            _epoch(UTC_ZONE, 2026, 3, 28, 23),
            _epoch(UTC_ZONE, 2026, 3, 29, 22),
        ),
        (
            "week",
            BERLIN,
            datetime(2026, 3, 29, 12, tzinfo=BERLIN),
            "2026-W13",
            _epoch(UTC_ZONE, 2026, 3, 22, 23),
            _epoch(UTC_ZONE, 2026, 3, 29, 22),
        ),
        # Berlin, fall back on 2026-10-25: a 25-hour day; October has 31 days and one extra hour
        (
            "day",
            BERLIN,
            datetime(2026, 10, 25, 12, tzinfo=BERLIN),
            "2026-10-25",
            _epoch(UTC_ZONE, 2026, 10, 24, 22),
            _epoch(UTC_ZONE, 2026, 10, 25, 23),
        ),
        (
            "month",
            BERLIN,
            datetime(2026, 10, 15, tzinfo=BERLIN),
            "2026-10",
            _epoch(UTC_ZONE, 2026, 9, 30, 22),
            _epoch(UTC_ZONE, 2026, 10, 31, 23),
        ),
        # New York, month of March 2026 (DST from 8 March)
        (
            "month",
            NEW_YORK,
            datetime(2026, 3, 20, tzinfo=NEW_YORK),
            "2026-03",
            _epoch(UTC_ZONE, 2026, 3, 1, 5),
            _epoch(UTC_ZONE, 2026, 4, 1, 4),
        ),
        # Santiago: 2026-09-06 has no midnight; its day starts at the change, 04:00 UTC (00:00 -04 = 01:00 -03)
        (
            "day",
            SANTIAGO,
            datetime(2026, 9, 6, 12, tzinfo=SANTIAGO),
            "2026-09-06",
            _epoch(UTC_ZONE, 2026, 9, 6, 4),
            _epoch(UTC_ZONE, 2026, 9, 7, 3),
        ),
        # epoch seconds work as well as aware datetimes
        (
            "day",
            UTC_ZONE,
            float(_epoch(UTC_ZONE, 2026, 12, 2) - 1),
            "2026-12-01",
            _epoch(UTC_ZONE, 2026, 12, 1),
            _epoch(UTC_ZONE, 2026, 12, 2),
        ),
    ],
)
def test_window_at(window: Window, zone: ZoneInfo, now: datetime | float, label: str, start: int, end: int) -> None:
    assert window_at(window, zone, now) == CalendarWindow(window, label, start, end)


@pytest.mark.parametrize("zone", [UTC_ZONE, BERLIN, NEW_YORK, SANTIAGO, TOKYO, ZoneInfo("Australia/Lord_Howe")])
@pytest.mark.parametrize("window", WINDOWS)
def test_windows_tile_time_and_start_on_the_first_local_instant(zone: ZoneInfo, window: Window) -> None:
    """Over two years: consecutive windows meet exactly, and each starts at the first instant whose
    local date is the window's first day (the instant before is the day before, local time)."""
    now = datetime(2026, 1, 1, 12, tzinfo=zone).timestamp()
    current = window_at(window, zone, now)
    while current.start < datetime(2028, 1, 1, tzinfo=zone).timestamp():
        first = datetime.fromtimestamp(current.start, zone)
        before = datetime.fromtimestamp(current.start - 1, zone)
        assert first.date() != before.date()
        assert first.time().hour <= 1  # midnight, or the DST change that skipped it
        assert window == "day" or (window == "week" and first.weekday() == 0) or first.day == 1
        following = window_at(window, zone, current.end)
        assert following.start == current.end and following.label != current.label
        assert window_at(window, zone, current.end - 1) == current
        current = following


@pytest.mark.parametrize("window", WINDOWS)
def test_candidates_are_previous_current_and_next(window: Window) -> None:
    now = datetime(2026, 12, 31, 23, 30, tzinfo=BERLIN)
    candidates = candidate_windows(window, BERLIN, now)
    current = window_at(window, BERLIN, now)
    assert len(candidates.labels) == 3 and len(candidates.starts) == 4
    assert candidates.at(now.timestamp()) == current
    assert candidates.starts[1:3] == (current.start, current.end)
    assert candidates.at(current.start - 1) == window_at(window, BERLIN, current.start - 1)
    assert candidates.at(current.end) == window_at(window, BERLIN, current.end)
    assert candidates.at(candidates.starts[0] - 10**6).label == candidates.labels[0]  # before all: the first


@pytest.mark.parametrize(
    ("window", "replica_skew", "store_now", "expected"),
    [
        # the store's clock decides: a replica 10 minutes behind, the store already in the new window
        ("day", timedelta(minutes=-10), datetime(2027, 1, 1, 0, 5, tzinfo=UTC), "2027-01-01"),
        ("week", timedelta(minutes=-10), datetime(2027, 1, 4, 0, 5, tzinfo=UTC), "2027-W01"),
        ("month", timedelta(minutes=-10), datetime(2027, 1, 1, 0, 5, tzinfo=UTC), "2027-01"),
        # a replica ahead, the store still in the old window
        ("month", timedelta(minutes=10), datetime(2026, 12, 31, 23, 55, tzinfo=UTC), "2026-12"),
        ("week", timedelta(hours=3), datetime(2027, 1, 3, 23, 0, tzinfo=UTC), "2026-W53"),
    ],
)
def test_the_store_clock_picks_the_window_near_an_edge(
    window: Window, replica_skew: timedelta, store_now: datetime, expected: str
) -> None:
    candidates = candidate_windows(window, UTC_ZONE, store_now + replica_skew)
    assert candidates.at(store_now.timestamp()).label == expected


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        window_at("day", UTC_ZONE, datetime(2026, 12, 1))


def test_day_candidates_match_the_limiters_days() -> None:
    from proxy.limits.days import candidate_days

    now = datetime(2026, 3, 29, 12, tzinfo=BERLIN)
    days = candidate_days(BERLIN, now)
    candidates = candidate_windows("day", BERLIN, now)
    assert (candidates.labels, candidates.starts) == (days.labels, days.starts)
    assert date.fromisoformat(candidates.labels[1]) == now.date()
