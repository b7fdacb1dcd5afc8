"""Keys and teams created at runtime: create, read, update, rotate, revoke; names unique across
the config file and the registry; every change versioned and audited.

The plain key exists only in `Created.key`, once; the store keeps its sha256. Entries named in the
config file are read-only here (`ManagedByConfig`). Fences (see layout.py) are written before the
entry, so a credential is refused by the admit script from the moment its revocation is accepted.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from .audit import AuditRecord, record
from .entries import Credential, KeyEntry, KeyPatch, KeySpec, TeamEntry, TeamPatch, TeamSpec, stored_json
from .errors import Conflict, ManagedByConfig, NameTaken, NotFound, RegistryError, UnknownTeam
from .snapshot import Snapshot, decode
from .store import Fence, RegistryBackend

KEY_PREFIX = "sk-proxy-"  # as proxy.request.authenticate.KEY_PREFIX: one look for every proxy key
MAX_GRACE_S = 30 * 86_400
MAX_AUDIT_SCAN = 10_000


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Created:
    """A key just made or rotated; `key` is shown this once and stored nowhere."""

    entry: KeyEntry
    key: str


class Registry:
    def __init__(
        self,
        backend: RegistryBackend,
        *,
        config_keys: Collection[str] = (),
        config_teams: Collection[str] = (),
        on_change: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.backend = backend
        self.set_config_names(config_keys, config_teams)
        self._on_change = on_change  # e.g. this replica's RegistryCache.refresh

    def set_config_names(self, keys: Collection[str], teams: Collection[str]) -> None:
        """The config file's key and team names (again after a reload): read-only, and taken."""
        self.config_keys = frozenset(keys)
        self.config_teams = frozenset(teams)

    # -- reads -----------------------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        return decode(await self.backend.load())

    async def list_keys(self, team: str | None = None) -> list[KeyEntry]:
        keys = (await self.snapshot()).keys.values()
        return sorted((k for k in keys if team is None or k.team == team), key=lambda k: k.name)

    async def get_key(self, name: str) -> KeyEntry:
        self._writable(name, self.config_keys, "key")
        entry = (await self.snapshot()).keys.get(name)
        if entry is None:
            raise NotFound(f"No key named {name!r}.")
        return entry

    async def list_teams(self) -> list[TeamEntry]:
        return sorted((await self.snapshot()).teams.values(), key=lambda t: t.name)

    async def get_team(self, name: str) -> TeamEntry:
        self._writable(name, self.config_teams, "team")
        entry = (await self.snapshot()).teams.get(name)
        if entry is None:
            raise NotFound(f"No team named {name!r}.")
        return entry

    async def audit(self, limit: int = 100, team: str | None = None) -> list[AuditRecord]:
        """Newest first; with `team`, only records about that team and its keys."""
        texts = await self.backend.audit(limit if team is None else MAX_AUDIT_SCAN)
        records = [AuditRecord.model_validate_json(text) for text in texts]
        return [r for r in records if team is None or r.team == team][:limit]

    # -- keys ------------------------------------------------------------------------------------
    async def create_key(self, spec: KeySpec, *, admin: str) -> Created:
        self._writable(spec.name, self.config_keys, "key")
        if spec.team not in self.config_teams and spec.team not in (await self.snapshot()).teams:
            raise UnknownTeam(f"No team named {spec.team!r}.")
        now = await self.backend.now_ms()
        secret = new_secret()
        credential = Credential(id=secrets.token_hex(8), sha256=sha256_hex(secret))
        entry = KeyEntry(**spec.model_dump(), credentials=[credential], created_ms=now, updated_ms=now)
        audit = record(now, admin, "create", "key", spec.name, spec.team, spec.model_dump(exclude={"name"}))
        try:
            version = await self._write_key(entry, None, audit, now)
        except Conflict:
            raise NameTaken(f"A key named {spec.name!r} already exists.") from None
        return Created(entry.model_copy(update={"rev": version}), secret)

    async def update_key(self, name: str, patch: KeyPatch, *, admin: str) -> KeyEntry:
        current = await self.get_key(name)
        changes = patch.model_dump(exclude_unset=True)
        now = await self.backend.now_ms()
        entry = _live_credentials(current.model_copy(update={**_fields(patch), "updated_ms": now}), now)
        audit = record(now, admin, "update", "key", name, current.team, changes)
        version = await self._write_key(entry, current.rev, audit, now)
        return entry.model_copy(update={"rev": version})

    async def rotate_key(self, name: str, grace_s: int, *, admin: str) -> Created:
        """A new key for `name`; the ones before it keep working `grace_s` more seconds."""
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise RegistryError(f"grace_s must be between 0 and {MAX_GRACE_S}.")
        current = await self.get_key(name)
        now = await self.backend.now_ms()
        ends = now + grace_s * 1000
        secret = new_secret()
        older = [
            c.model_copy(update={"until_ms": ends if c.until_ms is None else min(c.until_ms, ends)})
            for c in current.credentials
        ]
        fresh = Credential(id=secrets.token_hex(8), sha256=sha256_hex(secret))
        entry = _live_credentials(current.model_copy(update={"credentials": [fresh, *older], "updated_ms": now}), now)
        audit = record(now, admin, "rotate", "key", name, current.team, {"grace_s": grace_s})
        version = await self._write_key(entry, current.rev, audit, now, ended=current.credentials)
        return Created(entry.model_copy(update={"rev": version}), secret)

    async def revoke_key(self, name: str, *, admin: str) -> None:
        """From the moment this returns, no request with this key is admitted (fence first)."""
        current = await self.get_key(name)
        now = await self.backend.now_ms()
        audit = record(now, admin, "revoke", "key", name, current.team, {})
        await self.backend.set_fences([(current.team, c.id, 0) for c in current.credentials], now)
        try:
            await self.backend.write("keys", name, current.rev, None, audit.model_dump_json(), now)
        except Conflict:
            await self._refence(name, now)
            raise
        await self._changed()

    # -- teams -----------------------------------------------------------------------------------
    async def create_team(self, spec: TeamSpec, *, admin: str) -> TeamEntry:
        self._writable(spec.name, self.config_teams, "team")
        now = await self.backend.now_ms()
        entry = TeamEntry(**spec.model_dump(), created_ms=now, updated_ms=now)
        audit = record(now, admin, "create", "team", spec.name, spec.name, spec.model_dump(exclude={"name"}))
        try:
            version = await self.backend.write(
                "teams", spec.name, None, stored_json(entry), audit.model_dump_json(), now
            )
        except Conflict:
            raise NameTaken(f"A team named {spec.name!r} already exists.") from None
        await self._changed()
        return entry.model_copy(update={"rev": version})

    async def update_team(self, name: str, patch: TeamPatch, *, admin: str) -> TeamEntry:
        current = await self.get_team(name)
        now = await self.backend.now_ms()
        entry = current.model_copy(update={**_fields(patch), "updated_ms": now})
        audit = record(now, admin, "update", "team", name, name, patch.model_dump(exclude_unset=True))
        version = await self.backend.write("teams", name, current.rev, stored_json(entry), audit.model_dump_json(), now)
        await self._changed()
        return entry.model_copy(update={"rev": version})

    async def delete_team(self, name: str, *, admin: str) -> None:
        current = await self.get_team(name)
        users = [k.name for k in (await self.snapshot()).keys.values() if k.team == name]
        if users:
            raise Conflict(f"Team {name!r} still has keys ({len(users)}); revoke them first.")
        now = await self.backend.now_ms()
        audit = record(now, admin, "delete", "team", name, name, {})
        await self.backend.write("teams", name, current.rev, None, audit.model_dump_json(), now)
        await self._changed()

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _writable(name: str, config_names: frozenset[str], kind: str) -> None:
        if name in config_names:
            raise ManagedByConfig(f"The {kind} {name!r} is defined in the config file; change it there.")

    async def _write_key(
        self,
        entry: KeyEntry,
        expected_rev: int | None,
        audit: AuditRecord,
        now: int,
        ended: Collection[Credential] = (),
    ) -> int:
        kept = {c.id for c in entry.credentials}
        fences: list[Fence] = [(entry.team, c.id, entry.ends_ms(c)) for c in entry.credentials]
        fences += [(entry.team, c.id, 0) for c in ended if c.id not in kept]
        await self.backend.set_fences(fences, now)
        try:
            version = await self.backend.write(
                "keys", entry.name, expected_rev, stored_json(entry), audit.model_dump_json(), now
            )
        except Conflict:
            if expected_rev is not None:
                await self._refence(entry.name, now)
            raise
        await self._changed()
        return version

    async def _refence(self, name: str, now: int) -> None:
        """After a lost race: the fences as the entry that won says."""
        entry = (await self.snapshot()).keys.get(name)
        if entry is not None:
            await self.backend.set_fences([(entry.team, c.id, entry.ends_ms(c)) for c in entry.credentials], now)

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()


def _fields(patch: KeyPatch | TeamPatch) -> dict[str, Any]:
    """The patch's given fields as entry values (models stay models)."""
    return {name: getattr(patch, name) for name in patch.model_fields_set}


def _live_credentials(entry: KeyEntry, now: int) -> KeyEntry:
    """Without the credentials whose grace is over."""
    live = [c for c in entry.credentials if c.until_ms is None or c.until_ms > now]
    return entry.model_copy(update={"credentials": live})
