"""`/admin/keys/{name}`, `/admin/teams`, `/admin/audit`: runtime keys and teams (proxy.registry),
behind an admin key. A team-scoped admin key manages only its team's keys and cannot change
teams; entries from the config file are read here and refused for change (409
`managed_by_config`). A key's plain text is in the reply of its create or rotate, once.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from ..errors import OutOfScope, ProxyError
from ..registry import KeyEntry, KeyPatch, KeySpec, Registry, RegistryError, TeamPatch, TeamSpec
from ..registry.permissions import Admin, audit_team_filter, may_manage_keys_of, may_manage_teams, may_read_team
from ..registry.registry import MAX_GRACE_S
from ..request.runtime_keys import RuntimeKeys
from ..snapshot import SnapshotHolder
from ..usage.report import keys_overview
from .admin_api import ERRORS, admin_dependency

MAX_AUDIT_LIMIT = 1000


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: int = Field(0, ge=0, le=MAX_GRACE_S)


def registry_error(exc: RegistryError) -> ProxyError:
    """A registry refusal as the client's error, OpenAI-shaped, with the registry's status and code."""
    error = ProxyError(exc.message, code=exc.code)
    error.status = exc.status
    error.type = "server_error" if exc.status >= 500 else "invalid_request_error"
    return error


def router(snapshots: SnapshotHolder, registry: Registry, runtime: RuntimeKeys) -> APIRouter:
    require_admin = admin_dependency(snapshots)
    api = APIRouter(prefix="/admin", tags=["admin"], responses=ERRORS)

    def current() -> Registry:
        config = snapshots.config  # a reload may have changed the names the config file holds
        registry.set_config_names(config.keys, config.teams)
        return registry

    def config_key(name: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = keys_overview(snapshots.config)["keys"].get(name)
        return None if entry is None else {"name": name, **entry, "source": "config"}

    def config_team(name: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = keys_overview(snapshots.config)["teams"].get(name)
        return None if entry is None else {"name": name, **entry, "source": "config"}

    def may_keys(admin: Admin, team: str) -> None:
        if not may_manage_keys_of(admin, team):
            raise OutOfScope(f"Admin key {admin.name!r} manages only the keys of team {admin.team!r}.")

    def may_teams(admin: Admin) -> None:
        if not may_manage_teams(admin):
            raise OutOfScope(f"Admin key {admin.name!r} is scoped to team {admin.team!r}; it cannot change teams.")

    async def runtime_key(name: str, admin: Admin) -> KeyEntry:
        """A runtime key this admin may manage (409 for a config key, 403 out of scope, 404)."""
        config = config_key(name)
        if config is not None:
            may_keys(admin, config["team"])
        entry = await current().get_key(name)
        may_keys(admin, entry.team)
        return entry

    # -- keys (GET /admin/keys, the listing of both sources, is in admin_api) ---------------------
    @api.post("/keys", status_code=201)
    async def create_key(spec: KeySpec, admin: Admin = Depends(require_admin)) -> JSONResponse:
        """A new runtime key; its plain text is in this reply only."""
        may_keys(admin, spec.team)
        created = await current().create_key(spec, admin=admin.name)
        return JSONResponse({**created.entry.public(), "key": created.key}, status_code=201)

    @api.get("/keys/{name}")
    async def show_key(name: str, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        config = config_key(name)
        if config is not None:
            may_keys(admin, config["team"])
            return config
        entry = await current().get_key(name)
        may_keys(admin, entry.team)
        return entry.public()

    @api.patch("/keys/{name}")
    async def update_key(name: str, patch: KeyPatch, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        await runtime_key(name, admin)
        return (await current().update_key(name, patch, admin=admin.name)).public()

    @api.post("/keys/{name}/rotate")
    async def rotate_key(name: str, body: Rotation, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        """A new key for `name`; the old one keeps working `grace_s` more seconds."""
        await runtime_key(name, admin)
        created = await current().rotate_key(name, body.grace_s, admin=admin.name)
        return {**created.entry.public(), "key": created.key}

    @api.delete("/keys/{name}")
    async def revoke_key(name: str, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        """Revoked: refused by every replica from the moment this returns."""
        await runtime_key(name, admin)
        await current().revoke_key(name, admin=admin.name)
        return {"name": name, "revoked": True}

    # -- teams -----------------------------------------------------------------------------------
    @api.get("/teams")
    async def list_teams(admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        """Teams from the config file and the registry, with `source`."""
        teams = [t for t in (config_team(n) for n in snapshots.config.teams) if t is not None]
        names = {t["name"] for t in teams}
        teams += [t.public() for n, t in sorted(runtime.cache.teams.items()) if n not in names]
        return {"data": [t for t in teams if may_read_team(admin, t["name"])]}

    @api.post("/teams", status_code=201)
    async def create_team(spec: TeamSpec, admin: Admin = Depends(require_admin)) -> JSONResponse:
        may_teams(admin)
        return JSONResponse((await current().create_team(spec, admin=admin.name)).public(), status_code=201)

    @api.get("/teams/{name}")
    async def show_team(name: str, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        if not may_read_team(admin, name):
            raise OutOfScope(f"Admin key {admin.name!r} reads only team {admin.team!r}.")
        return config_team(name) or (await current().get_team(name)).public()

    @api.patch("/teams/{name}")
    async def update_team(name: str, patch: TeamPatch, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        may_teams(admin)
        return (await current().update_team(name, patch, admin=admin.name)).public()

    @api.delete("/teams/{name}")
    async def delete_team(name: str, admin: Admin = Depends(require_admin)) -> dict[str, Any]:
        may_teams(admin)
        await current().delete_team(name, admin=admin.name)
        return {"name": name, "deleted": True}

    # -- audit -----------------------------------------------------------------------------------
    @api.get("/audit")
    async def audit(
        limit: int = Query(100, ge=1, le=MAX_AUDIT_LIMIT), admin: Admin = Depends(require_admin)
    ) -> dict[str, Any]:
        """Every change, newest first (kept 90 days): which admin key, when, what. Never a secret."""
        records = await current().audit(limit, team=audit_team_filter(admin))
        return {"data": [r.model_dump(mode="json") for r in records]}

    return api
