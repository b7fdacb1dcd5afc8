"""The spend this replica last saw committed in the shared store, per budget and window.

Every admit reply carries the committed spend (spent + held) of each budget it checked: the key's
and team's enforced day budgets, and each window budget (week, month, the org's, an end user's,
any other day budget). When the store fails and `on_redis_error` is `allow`, the fallback store
starts each of those budgets from that figure, divided by `store.replicas` like the budget itself,
the first time in the outage a request reaches it: the replicas together cannot pass
budget - seen (plus whatever this replica never saw), so a budget exhausted before the outage
stays refused during it.

What is remembered is bounded: marks of windows that are no longer current are forgotten when the
day changes, and at most `MAX_MARKS` are kept, the least recently seen dropped first (end users
are as many as the clients name): a budget dropped that way starts from zero in the fallback.
"""

from __future__ import annotations

from ..budgets.windows import WINDOWS, label_of_day
from .memory_store import MemoryStore
from .scopes import Scopes
from .types import BudgetDay, Decision, WindowBudget

# (team, budget, scope name, window label): budget "key" or "team" for a key's or team's enforced
# day budget, "<scope> <window>" for a window budget ("end_user month"); team "" for the org's
Mark = tuple[str, str, str, str]
MAX_MARKS = 100_000


def window_mark(team: str, w: WindowBudget, day: str) -> Mark:
    """The mark of window budget `w` in the window containing `day`."""
    return ("" if w.scope == "org" else team, f"{w.scope} {w.window}", w.name, label_of_day(w.window, day))


class SeenCommitted:
    def __init__(self, max_marks: int = MAX_MARKS) -> None:
        self.max_marks = max_marks
        self.committed: dict[Mark, int] = {}  # spent + held as the store last reported it, oldest first
        self._days: tuple[str, ...] = ()
        self._seeded: set[Mark] = set()  # fallback budgets seeded in the outage numbered `_seeded_in`
        self._seeded_in = 0

    def new_days(self, days: BudgetDay) -> None:
        """Forget the windows that contain none of `days` (the admission's candidates)."""
        if days.labels == self._days:
            return
        self._days = days.labels
        current = {label_of_day(window, day) for window in WINDOWS for day in days.labels}
        self.committed = {m: v for m, v in self.committed.items() if m[3] in current}

    def saw(self, scopes: Scopes, windows: tuple[WindowBudget, ...], decision: Decision) -> None:
        """Remember what an admit reply (`decision`, for `windows`) said was committed."""
        team = scopes.team.name
        for scope, committed in (
            (scopes.key, decision.key_committed_micros),
            (scopes.team, decision.team_committed_micros),
        ):
            if committed is not None:
                self._remember((team, scope.kind, scope.name, decision.day), committed)
        if len(decision.windows_committed_micros) == len(windows):
            for w, committed in zip(windows, decision.windows_committed_micros, strict=True):
                self._remember(window_mark(team, w, decision.day), committed)

    def _remember(self, mark: Mark, committed: int) -> None:
        self.committed.pop(mark, None)  # re-inserted: the most recently seen last
        self.committed[mark] = committed
        while len(self.committed) > self.max_marks:
            del self.committed[next(iter(self.committed))]

    def seed(
        self,
        fallback: MemoryStore,
        scopes: Scopes,
        windows: tuple[WindowBudget, ...],
        days: BudgetDay,
        replicas: int,
        outage: int,
    ) -> None:
        """Start the fallback's budgets of a request (`windows`: its fallback window budgets) from
        what was seen committed, divided by the replicas, once per budget and window in outage
        number `outage`."""
        if self._seeded_in != outage:  # a new outage: seed again from what was seen since
            self._seeded, self._seeded_in = set(), outage
        team = scopes.team.name
        for scope in (scopes.fallback_key, scopes.fallback_team):
            if scope.budget_micros is None:
                continue
            for day in days.labels:
                mark = (team, scope.kind, scope.name, day)
                if seen := self._first_time(mark):
                    fallback.seed_spent(team, scope, day, -(-seen // replicas))
        for w in windows:
            for day in days.labels:
                if seen := self._first_time(window_mark(team, w, day)):
                    fallback.seed_window_spent(team, w, day, -(-seen // replicas))

    def _first_time(self, mark: Mark) -> int:
        """What was seen committed for `mark` if it was not seeded yet in this outage, else 0."""
        if mark in self._seeded:
            return 0
        self._seeded.add(mark)
        return self.committed.get(mark, 0)
