"""Value objects crossing the store seam: what admit and settle take and return.

A request touches two *scopes*, its key and its team. Each scope may carry any of:
a request bucket (rpm, capacity rpm_burst), a token bucket (tpm, capacity tpm_burst), a
parallel cap (max_parallel) and a daily budget in integer micro-dollars. Admission checks every
one of them and, only if all admit, consumes from all at once (one Redis round trip, one Lua
script). Settlement returns the token difference, swaps the budget reservation for the real
cost, releases the parallel slot and writes the spend ledger (one round trip, idempotent per
request id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..budgets.windows import Window

# "share": an upstream quota has room, but other teams waiting for it are behind their fair share
Reason = Literal["rpm", "tpm", "parallel", "budget", "revoked", "share"]
ScopeKind = Literal["key", "team", "end_user"]
# who refused: a key's or team's limit or enforced day budget, one of the window budgets, or the
# upstream quotas of every candidate target
RefusingScope = Literal["key", "team", "end_user", "window", "upstream"]
BudgetScope = Literal["org", "team", "key", "end_user"]
WINDOW_DAYS: dict[Window, int] = {"day": 1, "week": 7, "month": 31}  # the longest each can be


@dataclass(frozen=True, slots=True)
class WindowBudget:
    """A budget over a calendar window of one scope, checked in the same admission as the limits.

    Every budget that is not a key's or team's enforced day budget is one of these: week and month
    windows, the org's and each end user's budgets, and shadow ones (`enforce=False`: a would-be
    refusal is reported in `Decision.shadow`, never made). The store books it in the window that
    contains the day it chose."""

    scope: BudgetScope
    name: str  # the key's, team's or end user's name; "" for the org
    window: Window
    micros: int
    enforce: bool = True
    alerts: tuple[int, ...] = ()  # spend thresholds (ascending) at which an alert fires once each


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """The limits of one scope. None means unlimited."""

    kind: ScopeKind
    name: str
    rpm: int | None = None
    rpm_burst: int | None = None  # capacity; defaults to rpm
    tpm: int | None = None
    tpm_burst: int | None = None  # capacity; defaults to tpm
    max_parallel: int | None = None
    budget_micros: int | None = None  # daily budget in micro-dollars
    alert_micros: int | None = None  # spend at which the budget alert fires (budget × alert ratio)
    enforce: bool = True  # False: its rpm, tpm and max_parallel are in shadow mode (never refuse)

    @property
    def request_capacity(self) -> int | None:
        return self.rpm_burst or self.rpm

    @property
    def token_capacity(self) -> int | None:
        return self.tpm_burst or self.tpm


@dataclass(frozen=True, slots=True)
class BudgetDay:
    """The budget day containing "now", as day boundaries in epoch seconds.

    The caller passes candidate days (yesterday, today, tomorrow in `budget_timezone`); the
    store picks the one containing *its own* clock, so replicas' clocks never decide the day.
    `starts` has one more entry than `labels`: day i spans [starts[i], starts[i+1]).
    """

    labels: tuple[str, ...]
    starts: tuple[int, ...]

    def label_at(self, now_s: float) -> str:
        """The candidate containing `now_s` (the last one that has started), as the store chooses."""
        label = self.labels[0]
        for name, start in zip(self.labels, self.starts, strict=False):
            if now_s >= start:
                label = name
        return label


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """A provider's quota: an upstream account's (`model` "") or one deployment's (an upstream and
    the model asked of it). Its buckets hold one minute's worth (no burst). None means unlimited."""

    upstream: str
    model: str = ""
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None


# The candidate targets of a request, in order, each as its quota scopes (a target's upstream
# account and its deployment, those that have limits): admission takes the first that fits.
# Empty: no quota applies (the request goes to the model's targets as they come).
Candidates = tuple[tuple[QuotaLimits, ...], ...]
QuotaLeft = tuple[int, int, int]  # one quota scope's remaining requests, tokens, parallel slots (UNLIMITED: none)

NO_END_USER = ScopeLimits("end_user", "")  # a request naming no end user, or a team without end-user limits


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: str
    team: ScopeLimits
    key: ScopeLimits
    tokens: int  # reserved: estimated prompt + max_tokens
    cost_micros: int  # reserved worst-case cost
    days: BudgetDay
    lease_ttl_ms: int = 900_000
    windows: tuple[WindowBudget, ...] = ()
    user: ScopeLimits = NO_END_USER  # the end user's rpm, tpm and max_parallel
    credential_id: str | None = None  # a runtime key's credential: names the fence admit checks
    quotas: Candidates = ()  # the candidate targets' upstream quotas: the first that fits is taken
    share: float = 1.0  # the team's weight at a contended upstream quota (`teams.NAME.share`)


@dataclass(frozen=True, slots=True)
class Renewal:
    """Push a live request's leases (parallel slots, budget holds, reservation) to now + lease TTL."""

    request_id: str
    team: ScopeLimits
    key: ScopeLimits
    day: str  # the budget day its admission chose (where its budget holds are)
    lease_ttl_ms: int
    windows: tuple[WindowBudget, ...] = ()
    user: ScopeLimits = NO_END_USER
    quotas: Candidates = ()  # as admitted: the chosen candidate's parallel leases are renewed


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket as OpenAI's x-ratelimit-* headers describe it."""

    limit: int
    remaining: int
    reset_ms: int  # time until the bucket is full again


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    reason: Reason | None = None
    scope: RefusingScope | None = None  # which scope refused
    retry_after_ms: int = 0  # exact wait before the same request would be admitted
    never_fits: bool = False  # the request exceeds a bucket's capacity: waiting won't help
    requests: BucketState | None = None  # tightest request bucket of key and team
    tokens: BucketState | None = None  # tightest token bucket of key and team
    budget_spent_micros: int = 0  # of the refusing (or tightest) budget scope
    budget_limit_micros: int = 0
    day: str = ""  # the budget day the store chose
    day_reset_s: int = 0  # seconds until that day ends
    # the request id was already settled or abandoned, so the admission changed nothing: only an
    # admit that reached the store after its caller gave up on it sees this
    stale: bool = False
    key_committed_micros: int | None = None  # the key's spent + held on that day; None without a budget
    team_committed_micros: int | None = None
    window: int | None = None  # the index in `Admission.windows` of the window budget that refused
    window_spent_micros: int = 0  # its spent + held, and its limit
    window_limit_micros: int = 0
    shadow: tuple[int, ...] = ()  # indices of the shadow window budgets that would have refused
    shadow_limits: tuple[str, ...] = ()  # "<scope>:<rpm|tpm|parallel>" a shadow limit would have refused
    # each of `Admission.windows`' spent + held in the window containing `day` (the fallback starts from it)
    windows_committed_micros: tuple[int, ...] = ()
    # the index in `Admission.quotas` of the candidate chosen (admitted) or freeing first (refused by
    # `upstream`); None without candidates
    target: int | None = None
    quota_left: tuple[QuotaLeft, ...] = ()  # each quota scope of `Admission.quotas` (flattened), after admission


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget as admission reads it: settled spend and live holds (reservations of requests in
    flight) in micro-dollars; a request fits while spent + held + its cost <= limit."""

    limit_micros: int
    spent_micros: int
    held_micros: int

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.spent_micros - self.held_micros)


@dataclass(frozen=True, slots=True)
class ScopeState:
    """One scope's limits as the next admission would find them; None where it has no such limit."""

    requests: BucketState | None = None
    tokens: BucketState | None = None
    max_parallel: int | None = None
    in_flight: int = 0  # live parallel leases
    budget: BudgetState | None = None  # its enforced day budget

    @property
    def free_leases(self) -> int | None:
        return None if self.max_parallel is None else max(0, self.max_parallel - self.in_flight)


@dataclass(frozen=True, slots=True)
class Peek:
    """What an admission would read now, by the store's clock, with nothing consumed (`Store.peek`).

    `revoked`: the caller's credential is fenced (the other fields are then empty)."""

    day: str = ""  # the budget day the store chose
    day_reset_ms: int = 0  # until that day ends
    key: ScopeState = ScopeState()
    team: ScopeState = ScopeState()
    user: ScopeState = ScopeState()
    windows: tuple[BudgetState, ...] = ()  # one per `Admission.windows`, in order
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """One request's tokens, in OpenAI's vocabulary whichever API reported them: `prompt_tokens`
    is the whole prompt, cached or not (for Anthropic: input + cache creation + cache read);
    `cached_tokens` (read from the prompt cache) and `cache_write_tokens` (written to it) are
    parts of it; `reasoning_tokens` are part of `completion_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    team: ScopeLimits
    key: ScopeLimits
    model: str
    day: str  # the day admission chose (spend is booked on the day the request was admitted)
    usage: Usage
    cost_micros: int  # real cost
    tags: tuple[tuple[str, str], ...] = field(default=())
    succeeded: bool = True  # counts as a request in the ledger either way
    # the admit's reply was lost and the request went nowhere: release whatever that admit may
    # have reserved, mark the id settled (so the admit, if it arrives later, is a no-op), book nothing
    abandoned: bool = False
    windows: tuple[WindowBudget, ...] = ()
    end_user: str = ""  # who the request named as its end user ("" for none): booked in the ledger
    user: ScopeLimits = NO_END_USER  # the end user's limits it was admitted under
    # the candidates it was admitted against: the one admission chose gets its unused tokens back and
    # its parallel slots released (an abandoned admission does not know which: the store does)
    quotas: Candidates = ()


@dataclass(frozen=True, slots=True)
class Settled:
    """What a settle did: falsy when this request id had already been settled."""

    applied: bool
    key_spent_micros: int = 0  # the day's settled spend after this request
    team_spent_micros: int = 0
    key_crossed: bool = False  # this settlement pushed the key past its alert threshold (once a day)
    team_crossed: bool = False
    window_spent_micros: tuple[int, ...] = ()  # each window budget's settled spend after this request
    # ... and the highest of its alert thresholds this settlement crossed first (1-based; 0: none)
    window_crossed: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return self.applied


HoldKind = Literal["requests", "tokens"]  # which of a provider's limits ran out (a bare 429 counts as requests)


@dataclass(frozen=True, slots=True)
class TargetHold:
    """A target (an upstream and the model asked of it) whose provider said it is out of capacity,
    held by every replica until `end_ms` by the store's clock (`proxy.request.shared_holds`)."""

    upstream: str
    model: str
    kind: HoldKind
    end_ms: int


@dataclass(frozen=True, slots=True)
class SharedHolds:
    """The holds that have not ended, as the store read them at `now_ms` (its clock)."""

    now_ms: int
    holds: tuple[TargetHold, ...] = ()


class Store(Protocol):
    """The seam between the limiter and where the counters live (Redis, or this process).

    Every operation raises `proxy.errors.StoreError` when the store cannot answer."""

    # the store's test clock (microseconds since the epoch), or None: the store's own clock
    # (Redis `TIME`), which also decides the budget day (`proxy.limits.days.BudgetCalendar`)
    clock_us: Callable[[], int] | None
    retention_days: int  # how long a day's spend ledger is kept (a reload may change it)

    async def admit(self, admission: Admission) -> Decision: ...

    async def peek(self, admission: Admission) -> Peek:
        """What `admit(admission)` would read, by the same script, consuming and writing nothing."""

    async def settle(self, settlement: Settlement) -> Settled:
        """Reconcile one admitted request; falsy if this request id was already settled."""

    async def renew(self, renewal: Renewal) -> bool:
        """Extend a live request's leases; False (and nothing changed) once it is settled or expired."""

    async def usage(self, day: str, teams: list[str]) -> dict[str, Any]:
        """The day's ledger: see `proxy.limits.ledger` for its shape."""

    async def budget_spent(
        self, day: str, teams_and_keys: Mapping[str, Iterable[str]]
    ) -> dict[tuple[ScopeKind, str], int]:
        """Settled spend in micros on `day`, {(kind, name): micros}, for {team: [keys]}."""

    async def hold(self, upstream: str, model: str, kind: HoldKind, hold_ms: int) -> int:
        """Hold a target for every replica until the store's now + `hold_ms`, or longer if it
        already is; returns the end kept (ms, the store's clock)."""

    async def holds(self) -> SharedHolds:
        """The store's now and every hold that has not ended by it."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
