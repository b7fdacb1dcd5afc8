"""`GET /v1/me`: what a key may see of itself. Its name, team, allowed models, limits, and every
budget window (key and team) with spent, remaining and reset time; never a key or a digest.

Spent is the settled spend of the store's ledger (what `/admin/usage` reports), so in-flight
reservations are not in it. Budget windows are a list so windows beyond the day can join it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ProxyError, StoreError, StoreUnavailable
from ..limits.days import BudgetCalendar
from ..limits.types import ScopeKind, Store
from ..pricing.cost import usd_to_micros
from ..request.authenticate import Caller, presented_key
from ..request.jwt_callers import JwtCallers, identify
from ..snapshot import SnapshotHolder
from .responses import error_response, request_id_of


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def _window(scope: str, name: str, usd: Decimal, spent: int, day: str, ends_s: int) -> dict[str, Any]:
    limit = usd_to_micros(usd)
    return {
        "scope": scope,
        "name": name,
        "window": "day",
        "period": day,
        "limit_micros": limit,
        "spent_micros": spent,
        "remaining_micros": max(0, limit - spent),
        "resets_at": _iso(ends_s),
    }


async def me(caller: Caller, snapshots: SnapshotHolder, store: Store, calendar: BudgetCalendar) -> dict[str, Any]:
    config = snapshots.config
    day, _, ends_s = calendar.today_bounds()
    spent = await store.budget_spent(day, {caller.team_name: [caller.key_name]})
    scopes: tuple[tuple[ScopeKind, str, Decimal | None], ...] = (
        ("key", caller.key_name, caller.key.daily_budget_usd),
        ("team", caller.team_name, caller.team.daily_budget_usd),
    )
    windows = [
        _window(kind, name, budget, spent.get((kind, name), 0), day, ends_s)
        for kind, name, budget in scopes
        if budget is not None
    ]
    return {
        "object": "proxy.me",
        "name": caller.key_name,
        "team": caller.team_name,
        "end_user": caller.end_user,
        "models": sorted(m for m in config.models if caller.may_use(m)),
        "limits": {
            "key": caller.key.limits.model_dump(exclude_none=True),
            "team": caller.team.limits.model_dump(exclude_none=True),
        },
        "budgets": windows,
    }


def add_routes(
    app: Starlette, snapshots: SnapshotHolder, store: Store, calendar: BudgetCalendar, jwt: JwtCallers | None = None
) -> None:
    async def get_me(request: Request) -> Response:
        request_id = request_id_of(request)
        try:
            snapshot = snapshots.current
            caller = await identify(snapshot.keyring, snapshot.config, presented_key(request.headers), jwt)
            try:
                body = await me(caller, snapshots, store, calendar)
            except StoreError:
                raise StoreUnavailable("The usage ledger is unavailable; please retry shortly.") from None
        except ProxyError as error:
            return error_response(error, request_id)
        return Response(orjson.dumps(body), media_type="application/json", headers={"x-request-id": request_id})

    app.add_route("/v1/me", get_me, methods=["GET"])
