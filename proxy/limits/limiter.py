"""Admit and settle one request against its key's and its team's limits and budgets.

The store (Redis, or this process) holds the truth; this module turns config into the store's
value objects, refusals into OpenAI's 429s, and store outages into the configured behaviour:
`allow` admits through a per-process fallback store with limits divided by `store.replicas`,
`deny` answers 503. The fallback starts each budget from the spend this replica last saw committed
in the store for that scope and day (divided by `store.replicas` like the limits), so a budget
exhausted before an outage stays refused during it. Settlements that cannot reach the store wait
in a bounded journal and are flushed when it returns (settle is idempotent per request id, so a
retry never counts twice).
Admitted requests that run longer than a third of `store.lease_ttl_s` have their leases renewed
in the store that admitted them, by one background task, until they settle: `max_parallel` and
budget holds count a stream of any length, while a dead replica's leases still end after the TTL.

An admit whose reply was lost may still run in Redis later (a pause, a partition). A request the
store then holds nothing for is *abandoned*: a settlement that releases whatever that admit
reserved and books nothing waits in the journal like any other, and its marker makes the admit a
no-op should it arrive after it. A request served by the fallback needs none: its own settlement
reaches Redis the same way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime
from zoneinfo import ZoneInfo

from ..request.authenticate import Caller
from ..config import Config, Limits
from ..errors import BudgetExceeded, RateLimited, StoreUnavailable
from ..pricing import format_usd, usd_to_micros
from .days import candidate_days
from .headers import openai_duration, rate_limit_headers, retry_headers
from .memory_store import MemoryStore
from .types import (
    Admission,
    BudgetDay,
    Decision,
    Renewal,
    ScopeLimits,
    Settled,
    Settlement,
    Store,
    StoreError,
    StoreUnreachable,
    Usage,
)

log = logging.getLogger("proxy.limits")

JOURNAL_CAPACITY = 100_000
DAY_EDGE_S = 3600  # this close to midnight, admission offers the store three candidate days
FLUSH_INTERVAL_S = 1.0
RENEW_FRACTION = 3  # a live request's leases are renewed every lease_ttl / 3 (checked twice as often)
LIMIT_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
LIMIT_TYPES = {"rpm": "requests", "tpm": "tokens", "parallel": "parallel_requests"}


def scope_limits(kind: str, name: str, limits: Limits, budget_usd, divisor: int = 1,
                 alert_ratio: float = 1.0) -> ScopeLimits:
    def part(value: int | None) -> int | None:
        return None if value is None else max(1, value // divisor)

    budget = None if budget_usd is None else max(1, usd_to_micros(budget_usd) // divisor)

    return ScopeLimits(
        kind=kind,
        name=name,
        rpm=part(limits.rpm),
        rpm_burst=part(limits.rpm_burst),
        tpm=part(limits.tpm),
        tpm_burst=part(limits.tpm_burst),
        max_parallel=part(limits.max_parallel),
        budget_micros=budget,
        alert_micros=None if budget is None else math.ceil(budget * alert_ratio),
    )


@dataclass(slots=True)
class Ticket:
    """An admitted request: what it reserved and where, until it is settled."""

    request_id: str
    caller: Caller
    decision: Decision
    tokens: int
    cost_micros: int
    store: Store
    key_scope: ScopeLimits
    team_scope: ScopeLimits
    degraded: bool = False  # admitted by the fallback store during an outage
    settled: bool = field(default=False)
    renewed_at: float = 0.0  # monotonic time of admission, then of the last lease renewal

    @property
    def headers(self) -> dict[str, str]:
        return rate_limit_headers(self.decision)


class Limiter:
    def __init__(self, config: Config, store: Store, *, fallback: MemoryStore | None = None):
        self.config = config
        self.store = store
        self.fallback = fallback
        self._zone = ZoneInfo(config.budget_timezone)
        self._days: BudgetDay | None = None
        self._outage_since: float | None = None
        self.journal: deque[Settlement] = deque(maxlen=JOURNAL_CAPACITY)
        self.journal_dropped = 0
        self._flusher: asyncio.Task | None = None
        self.lease_ttl_ms = config.store.lease_ttl_s * 1000
        self.on_store_error = None  # callable(op): metrics hook
        self.unsettled = 0  # admitted requests not yet settled (shutdown waits for them)
        self._all_settled = asyncio.Event()
        self._all_settled.set()
        # (team, scope kind, scope name, day) -> spent + held the store last reported
        self.seen_committed: dict[tuple[str, str, str, str], int] = {}
        self._seeded: set[tuple[str, str, str, str]] = set()  # fallback budgets seeded in this outage
        self.live: dict[str, Ticket] = {}  # admitted, not yet settled: their leases are renewed
        self._renewer: asyncio.Task | None = None

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: limits apply from the next request, a new budget_timezone too."""
        self.config = config
        if ZoneInfo(config.budget_timezone) != self._zone:
            self._zone, self._days = ZoneInfo(config.budget_timezone), None

    # -- scopes -------------------------------------------------------------------------------
    def scopes(self, caller: Caller, divisor: int = 1) -> tuple[ScopeLimits, ScopeLimits]:
        ratio = self.config.budget_alert_ratio
        key = scope_limits("key", caller.key_name, caller.key.limits, caller.key.daily_budget_usd, divisor, ratio)
        team = scope_limits("team", caller.team_name, caller.team.limits, caller.team.daily_budget_usd, divisor,
                            ratio)
        return key, team

    def days(self) -> BudgetDay:
        """The candidate budget days; the store picks the one its own clock is in.

        Within an hour of midnight: yesterday, today and tomorrow, so a replica whose clock is a
        little off still lets the store choose. Otherwise today alone, which spares the admit
        script eight keys."""
        now = self._now_s()
        days = self._days
        if days is None or not days.starts[1] <= now < days.starts[2]:
            days = self._days = candidate_days(self._zone, datetime.fromtimestamp(now, self._zone))
            self._today_only = BudgetDay(days.labels[1:2], days.starts[1:3])
            self.seen_committed = {m: v for m, v in self.seen_committed.items() if m[3] in days.labels}
        if days.starts[1] + DAY_EDGE_S <= now < days.starts[2] - DAY_EDGE_S:
            return self._today_only
        return days

    def _now_s(self) -> float:
        clock_us = getattr(self.store, "clock_us", None)  # a store pinned to a test clock
        return clock_us() / 1e6 if clock_us is not None else time.time()

    # -- admit --------------------------------------------------------------------------------
    async def admit(self, request_id: str, caller: Caller, tokens: int, cost_micros: int) -> Ticket:
        key, team = self.scopes(caller)
        admission = Admission(request_id, team, key, tokens, cost_micros, self.days(), self.lease_ttl_ms)
        store, degraded = self.store, False
        try:
            decision = await store.admit(admission)
            self._recovered()
            self._saw(caller, decision)
        except asyncio.CancelledError:
            self._abandon(admission)
            raise
        except Exception as exc:  # StoreError, or anything unforeseen from a driver: an outage either way
            if not isinstance(exc, StoreError):
                log.exception("unexpected error from the rate-limit store on admit")
            self._store_error("admit")
            self._outage(exc)
            sent = not isinstance(exc, StoreUnreachable)
            if self.config.store.on_redis_error == "deny" or self.fallback is None:
                if sent:
                    self._abandon(admission)
                raise StoreUnavailable("The rate-limit store is unavailable; please retry shortly.",
                                       headers={"retry-after": "1"}) from None
            key, team = self.scopes(caller, self.config.store.replicas)
            self._seed_fallback(caller.team, (key, team), admission.days)
            decision = await self.fallback.admit(replace(admission, key=key, team=team))
            if sent and not decision.admitted:
                self._abandon(admission)
            store, degraded = self.fallback, True
        if not decision.admitted:
            raise self._refusal(decision, caller)
        self.unsettled += 1
        self._all_settled.clear()
        ticket = Ticket(request_id, caller, decision, tokens, cost_micros, store, key, team, degraded,
                        renewed_at=time.monotonic())
        self.live[request_id] = ticket
        return ticket

    def _saw(self, caller: Caller, decision: Decision) -> None:
        if decision.key_committed_micros >= 0:
            self.seen_committed[(caller.team, "key", caller.name, decision.day)] = decision.key_committed_micros
        if decision.team_committed_micros >= 0:
            self.seen_committed[(caller.team, "team", caller.team, decision.day)] = decision.team_committed_micros

    def _seed_fallback(self, team: str, scopes: tuple[ScopeLimits, ScopeLimits], days: BudgetDay) -> None:
        """The first time in an outage a budget scope and day reach the fallback, start it from the
        spend last seen committed in the store, divided by the replicas like the budget itself: the
        replicas together cannot pass budget - seen (plus what this replica never saw)."""
        assert self.fallback is not None
        replicas = self.config.store.replicas
        for scope in scopes:
            if scope.budget_micros is None:
                continue
            for day in days.labels:
                mark = (team, scope.kind, scope.name, day)
                if mark in self._seeded:
                    continue
                self._seeded.add(mark)
                seen = self.seen_committed.get(mark)
                if seen:
                    self.fallback.seed_spent(team, scope, day, -(-seen // replicas))

    def _refusal(self, decision: Decision, caller: Caller) -> Exception:
        headers = rate_limit_headers(decision)
        who = f"key '{caller.key_name}'" if decision.scope == "key" else f"team '{caller.team_name}'"
        if decision.reason == "budget":
            headers["x-should-retry"] = "false"
            return BudgetExceeded(
                f"Daily budget exceeded for {who}: spent {format_usd(decision.budget_spent_micros)} of "
                f"{format_usd(decision.budget_limit_micros)} on {decision.day}; the budget resets in "
                f"{openai_duration(decision.day_reset_s * 1000)}.",
                headers=headers,
            )
        reason = decision.reason or "rpm"
        limit_type = LIMIT_TYPES[reason]
        if decision.never_fits:
            headers["x-should-retry"] = "false"
            return RateLimited(
                f"Request too large for {who}: it needs more {LIMIT_NAMES[reason]} than the limit's capacity "
                "allows, so it can never be admitted. Reduce the prompt or max_tokens.",
                limit_type=limit_type, headers=headers,
            )
        headers.update(retry_headers(decision.retry_after_ms))
        return RateLimited(
            f"Rate limit reached for {who} on {LIMIT_NAMES[reason]}. Please try again in "
            f"{openai_duration(decision.retry_after_ms)}.",
            limit_type=limit_type, headers=headers,
        )

    # -- settle -------------------------------------------------------------------------------
    async def settle(self, ticket: Ticket, model: str, usage: Usage, cost_micros: int,
                     tags: tuple[tuple[str, str], ...] = (), succeeded: bool = True) -> Settled | None:
        """Reconcile the ticket once; never raises for a store outage (the journal keeps it)."""
        if ticket.settled:
            return None
        ticket.settled = True
        self.live.pop(ticket.request_id, None)
        try:
            return await self._settle(ticket, model, usage, cost_micros, tags, succeeded)
        finally:
            self.unsettled -= 1
            if self.unsettled == 0:
                self._all_settled.set()

    async def _settle(self, ticket: Ticket, model: str, usage: Usage, cost_micros: int,
                      tags: tuple[tuple[str, str], ...], succeeded: bool) -> Settled | None:
        settlement = Settlement(ticket.request_id, ticket.team_scope, ticket.key_scope, model, ticket.decision.day,
                                usage, cost_micros, tags, succeeded)
        if ticket.degraded:
            await ticket.store.settle(settlement)  # the fallback store (limits / replicas) never fails
            key, team = self.scopes(ticket.caller)  # Redis gets the real limits, alert thresholds too
            settlement = replace(settlement, key=key, team=team)
        try:
            settled = await self.store.settle(settlement)
            self._recovered()
            return settled
        except Exception as exc:  # whatever failed, the spend waits in the journal
            if not isinstance(exc, StoreError):
                log.exception("unexpected error from the rate-limit store on settle")
            self._store_error("settle")
            self._outage(exc)
            self._journal(settlement)
            return None

    def _abandon(self, admission: Admission) -> None:
        """Journal the release of an admission whose reply was lost (see the module docstring)."""
        self._journal(Settlement(admission.request_id, admission.team, admission.key, "",
                                 admission.days.label_at(self._now_s()), Usage(), 0, succeeded=False,
                                 abandoned=True))

    def _store_error(self, op: str) -> None:
        if self.on_store_error is not None:
            self.on_store_error(op)

    def _journal(self, settlement: Settlement) -> None:
        if len(self.journal) == self.journal.maxlen:
            self.journal_dropped += 1
            log.error("spend journal full (%d entries): oldest settlement dropped", self.journal.maxlen)
        self.journal.append(settlement)

    async def flush_journal(self) -> int:
        """Push journaled settlements to the store; returns how many were flushed."""
        flushed = 0
        while self.journal:
            settlement = self.journal[0]
            try:
                await self.store.settle(settlement)
            except Exception as exc:
                if not isinstance(exc, StoreError):
                    log.exception("unexpected error from the rate-limit store on flush")
                self._store_error("flush")
                return flushed
            # settlements may have joined (and a full journal dropped its oldest) meanwhile:
            # remove exactly the one that was flushed
            if self.journal and self.journal[0] is settlement:
                self.journal.popleft()
            else:
                try:
                    self.journal.remove(settlement)
                except ValueError:
                    pass
            flushed += 1
        if flushed:
            log.warning("spend journal flushed: %d settlements", flushed)
        return flushed

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self.journal:
                await self.flush_journal()

    # -- lease renewal ------------------------------------------------------------------------
    async def renew_leases(self) -> int:
        """Renew the leases of every live request not renewed for lease_ttl / 3, in the store that
        admitted it; returns how many were renewed. A store that fails is retried next time; a
        request whose reservation is gone (settled, or expired while the store was away) is
        dropped from renewal."""
        due_before = time.monotonic() - self.lease_ttl_ms / 1000 / RENEW_FRACTION
        due = [t for t in self.live.values() if t.renewed_at <= due_before and not t.settled]
        if not due:
            return 0
        results = await asyncio.gather(*(self._renew(t) for t in due), return_exceptions=True)
        renewed = 0
        for ticket, result in zip(due, results):
            if result is True:
                renewed += 1
            elif result is False:
                self.live.pop(ticket.request_id, None)
            else:
                self._store_error("renew")
                if not isinstance(result, StoreError):
                    log.error("unexpected error renewing a lease: %r", result)
        return renewed

    async def _renew(self, ticket: Ticket) -> bool:
        started = time.monotonic()
        renewal = Renewal(ticket.request_id, ticket.team_scope, ticket.key_scope, ticket.decision.day,
                          self.lease_ttl_ms)
        renewed = await ticket.store.renew(renewal)
        if renewed:
            ticket.renewed_at = started
        return renewed

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_ms / 1000 / RENEW_FRACTION / 2)
            if self.live:
                try:
                    await self.renew_leases()
                except Exception:  # never let the renewer die
                    log.exception("lease renewal failed")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self, flush_for_s: float = 10.0) -> None:
        """Wait for admitted requests to settle, stop the flusher, then keep flushing the journal
        for up to `flush_for_s`."""
        deadline = time.monotonic() + flush_for_s
        if self.unsettled:
            try:
                await asyncio.wait_for(self._all_settled.wait(), flush_for_s)
            except TimeoutError:
                log.error("%d admitted requests were still unsettled at shutdown", self.unsettled)
        for task in (self._flusher, self._renewer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._flusher = self._renewer = None
        while True:
            await self.flush_journal()
            if not self.journal or time.monotonic() >= deadline:
                break
            await asyncio.sleep(FLUSH_INTERVAL_S / 4)
        if self.journal:
            log.error("%d settlements could not be flushed at shutdown: their spend is lost", len(self.journal))

    def _outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.error("rate-limit store unavailable (%s); on_redis_error=%s", type(exc).__name__,
                      self.config.store.on_redis_error)

    def _recovered(self) -> None:
        if self._outage_since is not None:
            self._seeded.clear()
            log.warning("rate-limit store recovered after %.1fs", time.monotonic() - self._outage_since)
            self._outage_since = None


def reserved_tokens(prompt_tokens: int, max_output: int) -> int:
    return max(1, math.ceil(prompt_tokens + max_output))
