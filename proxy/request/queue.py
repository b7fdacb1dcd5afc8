"""The bounded queue: a request a rate limit refuses may wait for capacity instead of a 429.

A key or team with `limits.max_wait_ms` lets its requests wait that long when a request, token
or parallel limit (its key's, team's or end user's), or a provider's hold on every target,
refuses them. Waiting never bypasses admission: a waiter is admitted by the same admit as any
request, when its turn comes. Refused at once, as without a queue:

    a budget refusal, or a request that can never fit             (budgets never wait)
    a known wait (a bucket's refill, a hold's end) past max_wait_ms (the store says how long)
    a team with `max_queue` waiters already on this replica

Turns, within one replica: by priority class (`high`, `normal`, `low`: the key's, or a lower one
the request asks for with `x-proxy-priority`), then across teams the one with the fewest recent
admissions from the queue per unit of `share`, then first come first served. A waiter is tried
when its refusal said it could fit (a bucket's refill, a hold's end), when a request ends on this
replica (a slot or tokens may be free), and at its deadline; a waiter never overtakes an earlier
one refused by a scope they share (its key, team, end user, or a held target). A request that
arrives while waiters share one of its scopes joins them without trying first, so it does not
take capacity freed for them. Each replica orders its own waiters; the store keeps admission
exact across replicas. A client that leaves leaves the queue; an admission that raced its
departure is released at once.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ..config import Config, Priority, Target
from ..errors import InvalidRequest, ProxyError, RateLimited

PRIORITY_HEADER = "x-proxy-priority"
RANKS: dict[str, int] = {"high": 0, "normal": 1, "low": 2}
RECENT_S = 10.0  # admissions from the queue count for fair shares with this decay time
Scope = tuple[str, ...]
T = TypeVar("T")


def priority_rank(own: Priority, headers: Mapping[str, str]) -> int:
    """The request's class: its key's, or a lower one it asks for; a higher ask is ignored."""
    asked = headers.get(PRIORITY_HEADER)
    if asked is None:
        return RANKS[own]
    rank = RANKS.get(asked.strip().lower())
    if rank is None:
        raise InvalidRequest(
            f"Invalid '{PRIORITY_HEADER}' header: expected one of high, normal or low.", code="invalid_value"
        )
    return max(RANKS[own], rank)


def queueing_teams(config: Config) -> set[str]:
    """The teams whose requests may wait: the team's or one of its keys' `limits.max_wait_ms` is set."""
    teams = {name for name, team in config.teams.items() if team.limits.max_wait_ms}
    return teams | {key.team for key in config.keys.values() if key.limits.max_wait_ms}


def waiter_scopes(key: str, team: str, end_user: str | None, targets: Sequence[Target]) -> frozenset[Scope]:
    """What may refuse a request, as the queue names it (`Retry.blockers` names the same): its key,
    team and end user, each target, and its team's fair share of each target's quota."""
    scopes: set[Scope] = {("key", key), ("team", team)}
    scopes |= {("target", target.upstream, target.model) for target in targets}
    scopes |= {("team_target", team, target.upstream, target.model) for target in targets}
    if end_user:
        scopes.add(("end_user", team, end_user))
    return frozenset(scopes)


class QueueMetrics(Protocol):
    def queue_depth(self, team: str, depth: int) -> None: ...

    def queue_waited(self, team: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """Who would wait, and for how long."""

    team: str
    rank: int  # 0 high, 1 normal, 2 low
    max_wait_s: float
    max_queue: int
    share: float
    scopes: frozenset[Scope]  # what may refuse it: its key, team, end user and targets


@dataclass(eq=False, slots=True)
class _Waiter(Generic[T]):
    entry: Entry
    seq: int
    since: float
    deadline: float
    attempt: Callable[[], Awaitable[T]]
    release: Callable[[T], Awaitable[None]]
    done: asyncio.Future[T]
    not_before: float = 0.0
    blockers: frozenset[Scope] = frozenset()
    refused: RateLimited | None = None  # its last refusal
    blocked: bool = False  # behind an earlier waiter in the last turn


@dataclass(slots=True)
class _Recent:
    admitted: float = 0.0
    at: float = 0.0


class WaitQueue:
    """This replica's waiters, and the one task that gives them turns."""

    def __init__(self, metrics: QueueMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._waiters: list[_Waiter[object]] = []
        self._sharing: Counter[Scope] = Counter()
        self._depth: Counter[str] = Counter()
        self._recent: dict[str, _Recent] = {}
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._turns: asyncio.Task[None] | None = None

    def depth(self, team: str) -> int:
        return self._depth[team]

    def freed(self) -> None:
        """A request ended here: capacity may be free, so every waiter may try again now."""
        if self._waiters:
            for waiter in self._waiters:
                waiter.not_before = min(waiter.not_before, self.clock())
            self._poke()

    async def admit(
        self,
        entry: Entry,
        attempt: Callable[[], Awaitable[T]],
        release: Callable[[T], Awaitable[None]],
        waited: Callable[[float], None] | None = None,
    ) -> T:
        """`attempt()`'s result, at once or after waiting; raises its error when it cannot wait.
        `release` undoes an admission whose waiter left while it was being made; `waited` is told
        how long it waited, if it did."""
        since = self.clock()
        contended = any(self._sharing[scope] for scope in entry.scopes) if self._waiters else False
        full = self._depth[entry.team] >= entry.max_queue
        not_before, refused = since, None
        if not contended or full:
            try:
                return await attempt()
            except RateLimited as error:
                if error.retry is None or full or _too_late(error, since + entry.max_wait_s, since):
                    raise
                refused, not_before = error, since + error.retry.after_ms / 1000
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(entry, next(self._seq), since, since + entry.max_wait_s, attempt, release, done)
        waiter.not_before = min(not_before, waiter.deadline)
        if refused is not None and refused.retry is not None:
            waiter.refused, waiter.blockers = refused, refused.retry.blockers
        self._enter(waiter)
        try:
            return await done
        finally:
            if not done.done():
                done.cancel()  # the client left: a turn in progress releases what it admits
            self._leave(waiter)
            if waited is not None:
                waited(self.clock() - since)

    # -- membership ----------------------------------------------------------------------------
    def _enter(self, waiter: _Waiter[T]) -> None:
        self._waiters.append(waiter)  # type: ignore[arg-type]  # each waiter keeps its own T
        self._sharing.update(waiter.entry.scopes)
        team = waiter.entry.team
        self._depth[team] += 1
        if self.metrics is not None:
            self.metrics.queue_depth(team, self._depth[team])
        self._poke()

    def _leave(self, waiter: _Waiter[T]) -> None:
        if waiter not in self._waiters:
            return
        self._waiters.remove(waiter)  # type: ignore[arg-type]
        self._sharing.subtract(waiter.entry.scopes)
        team = waiter.entry.team
        self._depth[team] -= 1
        if self.metrics is not None:
            self.metrics.queue_depth(team, self._depth[team])
            self.metrics.queue_waited(team, self.clock() - waiter.since)
        self._poke()  # those behind it may go now

    def _poke(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._turns is None or self._turns.done():
            self._turns = asyncio.get_running_loop().create_task(self._give_turns())

    # -- turns ---------------------------------------------------------------------------------
    async def _give_turns(self) -> None:
        assert self._wake is not None
        while self._waiters:
            self._wake.clear()
            await self._one_round()
            waiting = [w for w in self._waiters if not w.done.done()]  # the others are on their way out
            due = min((w.deadline if w.blocked else w.not_before for w in waiting), default=math.inf)
            delay = due - self.clock()
            if self._wake.is_set() or delay <= 0:
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), None if due == math.inf else delay)
            except TimeoutError:
                pass

    def order(self) -> list[_Waiter[object]]:
        """Waiters in the order they get turns: class, then the team's weighted recent admissions,
        then arrival."""
        now = self.clock()
        return sorted(self._waiters, key=lambda w: (w.entry.rank, self._weighted(w.entry, now), w.seq))

    def _weighted(self, entry: Entry, now: float) -> float:
        recent = self._recent.get(entry.team)
        if recent is None:
            return 0.0
        return recent.admitted * math.exp(-(now - recent.at) / RECENT_S) / entry.share

    def _admitted(self, team: str) -> None:
        now = self.clock()
        recent = self._recent.setdefault(team, _Recent(at=now))
        recent.admitted = recent.admitted * math.exp(-(now - recent.at) / RECENT_S) + 1
        recent.at = now

    async def _one_round(self) -> None:
        blocked: dict[Scope, RateLimited] = {}
        for waiter in self.order():
            if waiter.done.done():
                continue  # gone
            now = self.clock()
            ahead = next((blocked[scope] for scope in waiter.entry.scopes if scope in blocked), None)
            waiter.blocked = ahead is not None
            if ahead is not None:
                if now >= waiter.deadline:
                    waiter.done.set_exception(waiter.refused or ahead)
                continue
            if waiter.not_before > now:
                if waiter.refused is not None:
                    blocked.update(dict.fromkeys(waiter.blockers, waiter.refused))
                continue
            await self._turn(waiter, blocked)

    async def _turn(self, waiter: _Waiter[T], blocked: dict[Scope, RateLimited]) -> None:
        try:
            admitted = await waiter.attempt()
        except RateLimited as error:
            now = self.clock()
            retry = error.retry
            if retry is None or now >= waiter.deadline or _too_late(error, waiter.deadline, now):
                _fail(waiter, error)
                return
            waiter.refused, waiter.blockers = error, retry.blockers
            waiter.not_before = min(now + retry.after_ms / 1000, waiter.deadline)
            blocked.update(dict.fromkeys(retry.blockers, error))
            return
        except ProxyError as error:
            _fail(waiter, error)
            return
        except Exception as error:  # a bug: the request's own handler logs it
            _fail(waiter, error)
            return
        if waiter.done.done():  # it left while this admission was being made
            await asyncio.shield(waiter.release(admitted))
            return
        waiter.done.set_result(admitted)
        self._admitted(waiter.entry.team)


def _fail(waiter: _Waiter[T], error: Exception) -> None:
    if not waiter.done.done():
        waiter.done.set_exception(error)


def _too_late(error: RateLimited, deadline: float, now: float) -> bool:
    """It would fit only after `deadline` (a parallel slot may free at any moment: never known)."""
    retry = error.retry
    return retry is not None and retry.exact and now + retry.after_ms / 1000 > deadline
