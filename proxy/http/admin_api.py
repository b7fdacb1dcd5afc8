"""`/admin/*`: spend and keys for operators, behind the admin key (never key material out)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from ..budgets.windows import WINDOWS
from ..errors import AdminRequired, InvalidApiKey, InvalidRequest, StoreError, StoreUnavailable
from ..limits.days import BudgetCalendar
from ..limits.types import Store
from ..registry.permissions import Admin
from ..request.authenticate import presented_key
from ..request.runtime_keys import RuntimeKeys, only_team, with_runtime
from ..snapshot import SnapshotHolder
from ..usage.report import GROUPINGS, grouped, keys_overview, usage_overview
from ..usage.window import window_usage

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error, shaped as OpenAI shapes its own."""

    error: ErrorDetail


ERRORS: dict[
    int | str, dict[str, Any]
] = {  # "4XX" also keeps FastAPI from documenting a 422 the proxy never sends (bad input is a 400)
    "4XX": {"model": ErrorBody, "description": "Bad request (400), no or unknown key (401), not the admin key (403)"},
    503: {"model": ErrorBody, "description": "The usage ledger's store is unavailable"},
}


def admin_dependency(snapshots: SnapshotHolder) -> Callable[[Request], Admin]:
    """The admin key presented (by name and scope); 401 for no or an unknown key, 403 for a user key."""

    def require_admin(request: Request) -> Admin:
        presented = presented_key(request.headers)
        if not presented:
            raise InvalidApiKey("The admin API needs the admin key as `Authorization: Bearer ...`.")
        keyring = snapshots.current.keyring
        admin = keyring.admin(presented)
        if admin is not None:
            return admin
        keyring.authenticate(presented)  # 401 for a key nobody knows
        raise AdminRequired("This key may not use the admin API.")

    return require_admin


def router(
    snapshots: SnapshotHolder, store: Store, calendar: BudgetCalendar, runtime: RuntimeKeys | None = None
) -> APIRouter:
    require_admin = admin_dependency(snapshots)
    api = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=ERRORS)

    @api.get("/usage")
    async def usage(
        date_: str | None = Query(None, alias="date", description="YYYY-MM-DD, default today"),
        window: str = Query("day", description="day, week or month: the window containing `date`"),
        by: str | None = Query(
            None,
            description="team, key, model, tag or end_user: answer with that grouping's rows "
            "(`{date, currency, by, total, rows}`) instead of the nested report",
        ),
        admin: Admin = Depends(require_admin),
    ) -> dict[str, Any]:
        """Spend, budget, remaining, requests and tokens per team and key, per model, per tag and per
        end user (the top spenders), over the day, week or month containing `date` (a team-scoped
        admin key: its team only).

        Without `by`: `{date, currency, total, teams: {team: {..., keys: {key: {..., models}}, tags,
        end_users}}}`. With `by`, the rows `llm-proxy usage --by` prints: `{date, currency, by,
        total, rows: [...]}`, one row per team (`by=team`), per team and key (`key`), per team, key
        and model (`model`), per team and tag (`tag`) or per team and end user (`end_user`: each
        team's top 100 spenders, the top spender first); each row names its group (`team`, `key`,
        `model`, `tag`, `end_user`) beside `spend_usd`, `spend_micros`, `budget_usd`,
        `remaining_usd` (a team's or key's day budget; null otherwise), `requests` and the token
        counts."""
        config = with_runtime(snapshots.config, runtime)
        if admin.team is not None:
            config = only_team(config, admin.team)
        day = date_ or calendar.today()
        if not DATE.match(day):
            raise InvalidRequest("`date` must be YYYY-MM-DD.", param="date")
        try:
            date.fromisoformat(day)
        except ValueError:
            raise InvalidRequest("`date` is not a calendar date.", param="date") from None
        if window not in WINDOWS:
            raise InvalidRequest("`window` must be day, week or month.", param="window")
        if by is not None and by not in GROUPINGS:
            raise InvalidRequest("`by` must be team, key, model, tag or end_user.", param="by")
        try:
            report = await window_usage(store, list(config.teams), day, window, calendar.today())
        except StoreError:
            raise StoreUnavailable("The usage ledger is unavailable; please retry shortly.") from None
        overview = usage_overview(config, report)
        return overview if by is None else grouped(overview, by)

    @api.get("/keys")
    async def keys(admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        """Keys by name with their team, limits, budget, models and `source` (config | api); teams
        likewise (a team-scoped admin key: its team only). No key material."""
        overview = keys_overview(snapshots.config)
        for section in ("teams", "keys"):
            for entry in overview[section].values():
                entry["source"] = "config"
        if runtime is not None:
            for name, team in runtime.cache.teams.items():
                overview["teams"].setdefault(name, team.public())
            for name, key in runtime.cache.keys.items():
                overview["keys"].setdefault(name, key.public())
        if admin.team is not None:
            overview["teams"] = {n: t for n, t in overview["teams"].items() if n == admin.team}
            overview["keys"] = {n: k for n, k in overview["keys"].items() if k["team"] == admin.team}
        return overview

    return api
