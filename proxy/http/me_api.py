"""`GET /v1/me`: what a caller may see of itself. Its name, team, end user, allowed models, its
limits with what remains of each, and every budget that applies to it; never a key or a digest.

Every figure comes from one peek (`Store.peek`): the admit script run in its dry-run mode on the
same admission a request of this caller would make (`shared_admission`), so it reads the very
records admission checks, by the store's clock, after refill and after expired leases and holds,
and writes nothing. Spent is a budget's settled spend in that record and held the reservations
of requests in flight; remaining is what the next request may still reserve. That spent is not
read from the ledger: the two agree while a budget has been configured for its whole window (the
settle script books both), but a budget added mid-window starts from zero where the ledger does
not, and the budget is what admission enforces.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from ..budgets.windows import WINDOWS, Window, label_of_day
from ..config import Config
from ..errors import InvalidApiKey, ProxyError, StoreError, StoreUnavailable
from ..limits.admission import shared_admission
from ..limits.days import BudgetCalendar
from ..limits.headers import openai_duration
from ..limits.types import BucketState, BudgetScope, BudgetState, ScopeLimits, ScopeState, Store
from ..request.authenticate import Caller, presented_key
from ..request.jwt_callers import JwtCallers, identify
from ..snapshot import SnapshotHolder
from .admin_api import ErrorBody
from .responses import error_response, request_id_of

SCOPE_ORDER: tuple[BudgetScope, ...] = ("key", "team", "end_user", "org")


class Bucket(BaseModel):
    """A request or token bucket, as the `x-ratelimit-*` headers describe it."""

    limit: int = Field(description="The rate, per minute")
    capacity: int = Field(description="The bucket's size: the burst, one minute's worth unless set")
    remaining: int = Field(description="Requests or tokens in the bucket now: what the next request may take")
    reset_ms: int = Field(description="Milliseconds until the bucket is full again")
    reset: str = Field(description="The same as OpenAI writes durations: 20ms, 1.5s, 6m0s")


class ParallelLeases(BaseModel):
    limit: int = Field(description="max_parallel")
    in_use: int = Field(description="Live leases: requests in flight")
    remaining: int = Field(description="Leases free now")


class ScopeLimitsNow(BaseModel):
    """One scope's limits, each with what remains now; a limit the scope does not have is absent."""

    enforce: bool = Field(description="false: shadow mode, the limits never refuse")
    rpm: Bucket | None = None
    tpm: Bucket | None = None
    max_parallel: ParallelLeases | None = None


class CallerLimits(BaseModel):
    key: ScopeLimitsNow
    team: ScopeLimitsNow
    end_user: ScopeLimitsNow | None = Field(
        None, description="The end user's, when the caller names one (a JWT's) and its team has end-user limits"
    )


class BudgetWindow(BaseModel):
    """One budget as admission checks it, in the window containing today."""

    scope: BudgetScope
    name: str = Field(description="The key's, team's or end user's name; \"\" for the org")
    window: Window
    period: str = Field(description='The window\'s label: "2026-12-01", "2026-W49" or "2026-12"')
    enforce: bool = Field(description="false: shadow mode, the budget never refuses")
    limit_micros: int
    spent_micros: int = Field(description="Settled spend")
    held_micros: int = Field(description="Reserved by requests in flight")
    remaining_micros: int = Field(description="limit - spent - held, at least 0")
    resets_at: str = Field(description="When the window ends in `budget_timezone`, as a UTC ISO-8601 instant")


class Me(BaseModel):
    """The caller's own figures: never a key, a digest or a token."""

    object: str = "proxy.me"
    name: str = Field(description="The key's name; a JWT caller's is `user:<end user>`")
    team: str
    end_user: str | None = Field(description="The end user a JWT names; null for a key")
    models: list[str] = Field(description="The models the caller may use")
    limits: CallerLimits
    budgets: list[BudgetWindow]


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def _bucket(rate: int | None, state: BucketState) -> Bucket:
    return Bucket(
        limit=rate or state.limit,
        capacity=state.limit,
        remaining=state.remaining,
        reset_ms=state.reset_ms,
        reset=openai_duration(state.reset_ms),
    )


def _limits(limits: ScopeLimits, state: ScopeState) -> ScopeLimitsNow:
    shown = ScopeLimitsNow(enforce=limits.enforce)
    if state.requests is not None:
        shown.rpm = _bucket(limits.rpm, state.requests)
    if state.tokens is not None:
        shown.tpm = _bucket(limits.tpm, state.tokens)
    if state.max_parallel is not None and state.free_leases is not None:
        shown.max_parallel = ParallelLeases(
            limit=state.max_parallel, in_use=state.in_flight, remaining=state.free_leases
        )
    return shown


def _budget(
    scope: BudgetScope, name: str, window: Window, enforce: bool, state: BudgetState, day: str, calendar: BudgetCalendar
) -> BudgetWindow:
    return BudgetWindow(
        scope=scope,
        name=name,
        window=window,
        period=label_of_day(window, day),
        enforce=enforce,
        limit_micros=state.limit_micros,
        spent_micros=state.spent_micros,
        held_micros=state.held_micros,
        remaining_micros=state.remaining_micros,
        resets_at=_iso(calendar.window_end(window, day)),
    )


async def me(caller: Caller, config: Config, store: Store, calendar: BudgetCalendar) -> Me:
    admission = shared_admission(f"peek-{secrets.token_hex(12)}", caller.scopes, caller.end_user, calendar.candidates())
    peek = await store.peek(admission)
    if peek.revoked:  # the fence: revoked, expired or rotated out, by the store's clock
        raise InvalidApiKey("Incorrect API key provided.")
    limits = CallerLimits(key=_limits(admission.key, peek.key), team=_limits(admission.team, peek.team))
    if admission.user.name:
        limits.end_user = _limits(admission.user, peek.user)
    budgets = [
        _budget(s.kind, s.name, "day", True, state, peek.day, calendar)
        for s, state in ((admission.key, peek.key.budget), (admission.team, peek.team.budget))
        if state is not None
    ]
    budgets += [
        _budget(w.scope, w.name, w.window, w.enforce, state, peek.day, calendar)
        for w, state in zip(admission.windows, peek.windows, strict=True)
    ]
    budgets.sort(key=lambda b: (SCOPE_ORDER.index(b.scope), WINDOWS.index(b.window)))
    return Me(
        object="proxy.me",
        name=caller.key_name,
        team=caller.team_name,
        end_user=caller.end_user,
        models=sorted(m for m in config.models if caller.may_use(m)),
        limits=limits,
        budgets=budgets,
    )


def add_routes(
    app: FastAPI, snapshots: SnapshotHolder, store: Store, calendar: BudgetCalendar, jwt: JwtCallers | None = None
) -> None:
    """The route, documented in the OpenAPI schema (`Me`); the answer is built here, not validated
    by FastAPI on the way out."""

    async def get_me(request: Request) -> Response:
        """The caller's name, team, end user and models, each of its limits with what remains now
        (requests and tokens in the bucket, free parallel leases, when the bucket is full again),
        and every budget that applies to it with spent, held, remaining and the window's end."""
        request_id = request_id_of(request)
        try:
            snapshot = snapshots.current
            caller = await identify(snapshot.keyring, snapshot.config, presented_key(request.headers), jwt)
            try:
                answer = await me(caller, snapshot.config, store, calendar)
            except StoreError:
                raise StoreUnavailable("The rate-limit store is unavailable; please retry shortly.") from None
        except ProxyError as error:
            return error_response(error, request_id)
        body = orjson.dumps(answer.model_dump(mode="json", exclude_unset=True))
        return Response(body, media_type="application/json", headers={"x-request-id": request_id})

    app.add_api_route(
        "/v1/me",
        get_me,
        methods=["GET"],
        response_model=Me,
        responses={
            "4XX": {"model": ErrorBody, "description": "No key, or a key or token that is not valid (401)"},
            503: {"model": ErrorBody, "description": "The rate-limit store is unavailable"},
        },
        tags=["self-service"],
        summary="The caller's limits and budgets",
    )
    app.add_api_route("/v1/me", get_me, methods=["HEAD"], include_in_schema=False)  # as every GET route of ours
