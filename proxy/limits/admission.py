"""Admission: reserve a request's worst case against its key's and team's limits and budgets, and
against the upstream quotas of the first of its candidate targets that has room (`quotas.py`).

The store decides (one script, one round trip). When it cannot answer, `on_redis_error` says
what happens: `allow` admits through this process's fallback store with the limits divided by
`store.replicas`, `deny` refuses. The fallback starts every budget from the spend this replica
last saw committed in the store for that scope and window (divided by `store.replicas` like the
limits; `seen.py`), so a budget exhausted before an outage stays refused during it. The answer is a
`Ticket` or a `Refusal`, never an HTTP error: the request path says what a refusal means to the
client.

An admit whose reply was lost may still run in Redis later (a pause, a partition). A request the
store then holds nothing for is *abandoned*: a settlement that releases whatever that admit
reserved and books nothing waits in the journal like any other, and its marker makes the admit a
no-op should it arrive after it. A request served by the fallback needs none: its own settlement
reaches Redis the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import StoreUnreachable
from .days import BudgetCalendar
from .headers import rate_limit_headers
from .health import StoreHealth
from .journal import Journal
from .memory_store import MemoryStore
from .quotas import NO_QUOTAS, QuotaCandidates
from .scopes import Scopes
from .seen import SeenCommitted
from .types import (
    NO_END_USER,
    Admission,
    BudgetDay,
    Candidates,
    Decision,
    QuotaLeft,
    QuotaLimits,
    ScopeLimits,
    Settlement,
    Store,
    Usage,
    WindowBudget,
)

# told each quota scope's remaining capacity after every admission the shared store decided
QuotaWatcher = Callable[[tuple[QuotaLimits, ...], tuple[QuotaLeft, ...]], None]


@dataclass(slots=True)
class Ticket:
    """An admitted request: what it reserved and where, until it is settled."""

    request_id: str
    scopes: Scopes
    decision: Decision
    tokens: int
    cost_micros: int
    store: Store
    degraded: bool = False  # admitted by the fallback store during an outage
    settled: bool = field(default=False)
    renewed_at: float = 0.0  # monotonic time of admission, then of the last lease renewal
    shared_windows: tuple[WindowBudget, ...] = ()  # its window budgets in the shared store
    fallback_windows: tuple[WindowBudget, ...] = ()  # ... and in the fallback (divided by the replicas)
    end_user: str = ""  # who the request named as its end user, if anyone
    shared_user: ScopeLimits = NO_END_USER  # its end user's limits in the shared store
    fallback_user: ScopeLimits = NO_END_USER  # ... and in the fallback
    quotas: QuotaCandidates = NO_QUOTAS  # its candidate targets; `decision.target` is the one it took

    @property
    def user_scope(self) -> ScopeLimits:
        return self.fallback_user if self.degraded else self.shared_user

    @property
    def quota_scopes(self) -> Candidates:
        """Its candidates' quota scopes in the store that admitted it."""
        return self.quotas.fallback if self.degraded else self.quotas.shared

    @property
    def windows(self) -> tuple[WindowBudget, ...]:
        """Its window budgets in the store that admitted it."""
        return self.fallback_windows if self.degraded else self.shared_windows

    @property
    def shadow_windows(self) -> tuple[WindowBudget, ...]:
        """The budgets in shadow mode that would have refused it."""
        return tuple(self.windows[i] for i in self.decision.shadow)

    @property
    def key_scope(self) -> ScopeLimits:
        """The key's limits in the store that admitted it."""
        return self.scopes.fallback_key if self.degraded else self.scopes.key

    @property
    def team_scope(self) -> ScopeLimits:
        return self.scopes.fallback_team if self.degraded else self.scopes.team

    @property
    def headers(self) -> dict[str, str]:
        return rate_limit_headers(self.decision)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request not admitted: the store's `decision` (a limit or budget), or None when the store
    could not answer and `on_redis_error` is `deny`."""

    scopes: Scopes
    decision: Decision | None
    windows: tuple[WindowBudget, ...] = ()  # the window budgets it was checked against
    resets_at: int = 0  # when the refusing budget's window ends (epoch seconds)
    user: ScopeLimits = NO_END_USER  # the end user's limits it was checked against
    quotas: QuotaCandidates = NO_QUOTAS  # the candidate targets it was checked against

    @property
    def window(self) -> WindowBudget | None:
        """The window budget that refused it, if one did."""
        index = None if self.decision is None else self.decision.window
        return None if index is None else self.windows[index]


def shared_admission(
    request_id: str,
    scopes: Scopes,
    end_user: str | None,
    days: BudgetDay,
    tokens: int = 0,
    cost_micros: int = 0,
    lease_ttl_ms: int = 900_000,
    quotas: Candidates = (),
) -> Admission:
    """What the shared store checks for a request of `scopes` from `end_user`: the key's, team's
    and end user's limits and every window budget. A peek (`GET /v1/me`) reads the same."""
    return Admission(
        request_id,
        scopes.team,
        scopes.key,
        tokens,
        cost_micros,
        days,
        lease_ttl_ms,
        scopes.for_end_user(end_user)[0],
        scopes.user_for(end_user)[0],
        scopes.credential_id,
        quotas,
        scopes.share,
    )


class Admitter:
    def __init__(
        self,
        store: Store,
        fallback: MemoryStore | None,
        *,
        allow_on_outage: bool,
        replicas: int,
        lease_ttl_ms: int,
        calendar: BudgetCalendar,
        journal: Journal,
        health: StoreHealth,
        on_quota: QuotaWatcher | None = None,
    ) -> None:
        self.store = store
        self.on_quota = on_quota
        self.fallback = fallback
        self.allow_on_outage = allow_on_outage
        self.replicas = replicas
        self.lease_ttl_ms = lease_ttl_ms
        self.calendar = calendar
        self.journal = journal
        self.health = health
        self.seen = SeenCommitted()  # what the store last reported committed: the fallback starts from it

    async def admit(
        self,
        request_id: str,
        scopes: Scopes,
        tokens: int,
        cost_micros: int,
        end_user: str | None = None,
        quotas: QuotaCandidates = NO_QUOTAS,
    ) -> Ticket | Refusal:
        days = self.calendar.candidates()
        admission = shared_admission(
            request_id, scopes, end_user, days, tokens, cost_micros, self.lease_ttl_ms, quotas.shared
        )
        windows, user = admission.windows, admission.user
        _, fallback_windows = scopes.for_end_user(end_user)
        _, fallback_user = scopes.user_for(end_user)
        self.seen.new_days(days)
        store: Store = self.store
        degraded = False
        try:
            decision = await store.admit(admission)
            self.health.answered()
            self.seen.saw(scopes, windows, decision)
            if quotas.shared and self.on_quota is not None:
                self.on_quota(tuple(q for candidate in quotas.shared for q in candidate), decision.quota_left)
        except asyncio.CancelledError:
            self._abandon(admission)
            raise
        except Exception as exc:  # StoreError, or anything unforeseen from a driver: an outage either way
            self.health.failed("admit", exc)
            sent = not isinstance(exc, StoreUnreachable)
            if not self.allow_on_outage or self.fallback is None:
                if sent:
                    self._abandon(admission)
                return Refusal(scopes, None, windows)
            self.seen.seed(self.fallback, scopes, fallback_windows, days, self.replicas, self.health.outages)
            decision = await self.fallback.admit(
                Admission(
                    request_id,
                    scopes.fallback_team,
                    scopes.fallback_key,
                    tokens,
                    cost_micros,
                    days,
                    self.lease_ttl_ms,
                    fallback_windows,
                    fallback_user,
                    quotas=quotas.fallback,
                    share=scopes.share,
                )
            )
            if sent and not decision.admitted:
                self._abandon(admission)
            store, degraded = self.fallback, True
        if not decision.admitted:
            checked = fallback_windows if degraded else windows
            resets_at = 0
            if decision.window is not None:
                resets_at = self.calendar.window_end(checked[decision.window].window, decision.day)
            elif decision.reason == "budget":  # a key's or team's enforced day budget
                resets_at = self.calendar.window_end("day", decision.day)
            return Refusal(scopes, decision, checked, resets_at, fallback_user if degraded else user, quotas)
        return Ticket(
            request_id,
            scopes,
            decision,
            tokens,
            cost_micros,
            store,
            degraded,
            shared_windows=windows,
            fallback_windows=fallback_windows,
            end_user=end_user or "",
            shared_user=user,
            fallback_user=fallback_user,
            quotas=quotas,
        )

    def _abandon(self, admission: Admission) -> None:
        """Journal the release of an admission whose reply was lost (see the module docstring)."""
        self.journal.add(
            Settlement(
                admission.request_id,
                admission.team,
                admission.key,
                "",
                admission.days.label_at(self.calendar.now_s()),
                Usage(),
                0,
                succeeded=False,
                abandoned=True,
                windows=admission.windows,
                user=admission.user,
                quotas=admission.quotas,
            )
        )
