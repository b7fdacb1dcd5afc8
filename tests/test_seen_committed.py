"""What a replica remembers of the committed spend the store reported (proxy/limits/seen.py), and
how it seeds the allow-mode fallback: every budget, once per outage, divided by the replicas,
bounded in memory. The outage itself, through the proxy and a killed redis-server, is in
tests/test_outage_fallback.py."""

from __future__ import annotations

from proxy.limits.memory_store import MemoryStore
from proxy.limits.scopes import Scopes
from proxy.limits.seen import SeenCommitted, window_mark
from proxy.limits.types import BudgetDay, Decision, ScopeLimits, WindowBudget
from tests.support.clock import Clock

DAY_S = 86_400
START = 20_788 * DAY_S  # 2026-12-01 00:00 UTC, a Tuesday
TODAY = BudgetDay(("2026-12-01",), (START, START + DAY_S))
NEXT_MONTH = BudgetDay(("2027-01-01",), (START + 31 * DAY_S, START + 32 * DAY_S))
KEY = ScopeLimits("key", "alice", budget_micros=1_000)
TEAM = ScopeLimits("team", "platform", budget_micros=3_000)
FALLBACK_KEY = ScopeLimits("key", "alice", budget_micros=333)
FALLBACK_TEAM = ScopeLimits("team", "platform", budget_micros=1_000)
WINDOWS = (
    WindowBudget("org", "", "month", 30_000),
    WindowBudget("team", "platform", "month", 9_000),
    WindowBudget("end_user", "ann", "week", 900),
)
FALLBACK_WINDOWS = tuple(WindowBudget(w.scope, w.name, w.window, w.micros // 3) for w in WINDOWS)


def scopes() -> Scopes:
    return Scopes(KEY, TEAM, FALLBACK_KEY, FALLBACK_TEAM, WINDOWS, FALLBACK_WINDOWS)


def reply(key: int | None, team: int | None, windows: tuple[int, ...], day: str = "2026-12-01") -> Decision:
    return Decision(
        True, day=day, key_committed_micros=key, team_committed_micros=team, windows_committed_micros=windows
    )


def spent(store: MemoryStore, name: str) -> int:
    return int(store.keys.hash(name, START * 1000).get("spent", 0))


def test_every_budget_is_seeded_once_per_outage_divided_by_the_replicas() -> None:
    seen = SeenCommitted()
    seen.new_days(TODAY)
    seen.saw(scopes(), WINDOWS, reply(900, 2_000, (20_000, 8_000, 800)))
    fallback = MemoryStore(clock_us=Clock(START * 1_000_000))
    seen.seed(fallback, scopes(), FALLBACK_WINDOWS, TODAY, 3, outage=1)
    layout = fallback.layout
    assert spent(fallback, layout.budget("platform", FALLBACK_KEY, "2026-12-01")) == 300
    assert spent(fallback, layout.budget("platform", FALLBACK_TEAM, "2026-12-01")) == 667  # rounded up
    assert [spent(fallback, layout.window_budget("platform", w, "2026-12-01")) for w in FALLBACK_WINDOWS] == [
        6_667,
        2_667,
        267,
    ]
    assert fallback.keys.pttl(layout.window_budget("platform", FALLBACK_WINDOWS[1], "2026-12-01"), START * 1000) == (
        33 * DAY_S * 1000  # the longest month and the day margin: the seed outlives its window
    )

    seen.saw(scopes(), WINDOWS, reply(990, 2_990, (29_000, 8_990, 890)))  # the outage ended: seen again
    seen.seed(fallback, scopes(), FALLBACK_WINDOWS, TODAY, 3, outage=1)  # same outage: not again
    assert spent(fallback, layout.window_budget("platform", FALLBACK_WINDOWS[2], "2026-12-01")) == 267
    seen.seed(fallback, scopes(), FALLBACK_WINDOWS, TODAY, 3, outage=2)  # the next outage: from the newer figure
    assert spent(fallback, layout.window_budget("platform", FALLBACK_WINDOWS[2], "2026-12-01")) == 297


def test_a_new_day_forgets_only_the_windows_that_ended() -> None:
    seen = SeenCommitted()
    seen.new_days(TODAY)
    seen.saw(scopes(), WINDOWS, reply(900, 2_000, (20_000, 8_000, 800)))
    seen.new_days(BudgetDay(("2026-12-02",), (START + DAY_S, START + 2 * DAY_S)))  # same week and month
    assert set(seen.committed) == {window_mark("platform", w, "2026-12-01") for w in WINDOWS}, (
        "the day budgets went, the week's and month's stayed"
    )
    seen.new_days(NEXT_MONTH)
    assert seen.committed == {}


def test_memory_is_bounded_the_least_recently_seen_dropped_first() -> None:
    seen = SeenCommitted(max_marks=4)
    seen.new_days(TODAY)

    def user(name: str) -> tuple[WindowBudget, ...]:
        return (WindowBudget("end_user", name, "week", 900),)

    for name in ("u1", "u2", "u3", "u4"):
        seen.saw(scopes(), user(name), reply(None, None, (10,)))
    seen.saw(scopes(), user("u1"), reply(None, None, (20,)))  # u1 seen again
    seen.saw(scopes(), user("u5"), reply(None, None, (30,)))
    assert [m[2] for m in seen.committed] == ["u3", "u4", "u1", "u5"], "u2 was the least recently seen"
    assert seen.committed[window_mark("platform", user("u1")[0], "2026-12-01")] == 20


def test_a_reply_for_other_windows_is_not_taken_for_these() -> None:
    seen = SeenCommitted()
    seen.saw(scopes(), WINDOWS, reply(None, None, (1, 2)))  # two figures for three budgets
    assert seen.committed == {}
