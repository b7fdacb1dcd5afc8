"""A budget refusal names the scope, what it spent of which budget, and when the window resets."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.budgets.refusal import budget_refusal, usd_text
from proxy.budgets.windows import window_at


def _at(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp())  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("team", "platform", 99_800_000, 100_000_000, "month", _at(2027, 1, 1)),
            "Team `platform` has spent $99.80 of its $100.00 monthly budget; it resets at 2027-01-01T00:00:00Z.",
        ),
        (
            ("key", "ci-bot", 4_999_999, 5_000_000, "day", _at(2026, 12, 2)),
            "Key `ci-bot` has spent $4.999999 of its $5.00 daily budget; it resets at 2026-12-02T00:00:00Z.",
        ),
        (
            ("org", "ignored", 0, 250_000_000_000, "week", _at(2026, 12, 7)),
            "The organisation has spent $0.00 of its $250000.00 weekly budget; it resets at 2026-12-07T00:00:00Z.",
        ),
        (
            ("end_user", "user-42", 1_500, 5_000, "day", _at(2026, 12, 2)),
            "End user `user-42` has spent $0.0015 of its $0.005 daily budget; it resets at 2026-12-02T00:00:00Z.",
        ),
        # a name from the request cannot break the message: no backticks, no control characters, cut
        (
            ("end_user", "a`b\nc" + "x" * 100, 1, 2, "day", _at(2026, 12, 2)),
            "End user `abc" + "x" * 61 + "...` has spent $0.000001 of its $0.000002 daily budget; "
            "it resets at 2026-12-02T00:00:00Z.",
        ),
    ],
)
def test_refusal_message(args: tuple, message: str) -> None:
    assert budget_refusal(*args) == message


def test_the_reset_is_the_windows_end_in_utc() -> None:
    """A month in Berlin ends at local midnight, 23:00 UTC on the last day."""
    window = window_at("month", ZoneInfo("Europe/Berlin"), datetime(2026, 12, 15, tzinfo=UTC))
    text = budget_refusal("team", "platform", 10, 10, "month", window.end)
    assert text.endswith("it resets at 2026-12-31T23:00:00Z.")


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (1, "$0.000001"),
        (10_000, "$0.01"),
        (99_800_000, "$99.80"),
        (1_234_567, "$1.234567"),
        (100_000_000, "$100.00"),
        (-500_000, "-$0.50"),
        (10**15, "$1000000000.00"),
    ],
)
def test_amounts_are_exact(micros: int, text: str) -> None:
    assert usd_text(micros) == text
