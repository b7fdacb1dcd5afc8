"""Each replica's copy of the registry: sha256 -> key, name -> team, answered from memory.

A background task reads the registry version every `POLL_INTERVAL_S` (one GET); when it moved,
it asks which names were written since (the changelog zset) and fetches only those, so a change reaches
every replica within about `POLL_INTERVAL_S` plus one read, and a request never waits on the
store for a lookup. A key past its expiry, or a credential past its rotation grace, is absent
(by this replica's clock; the fence in the admit script makes revocation exact by the store's).
When the store does not answer, the last copy keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError

from ..background import stop_tasks
from .entries import Credential, KeyEntry, TeamEntry
from .errors import StoreFailed
from .layout import Kind
from .snapshot import decode
from .store import RegistryBackend

POLL_INTERVAL_S = 0.3
Entry = TypeVar("Entry", KeyEntry, TeamEntry)

log = logging.getLogger("proxy.registry")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class CachedKey:
    """A runtime key as one credential authenticates it."""

    entry: KeyEntry
    credential_id: str  # names the fence the admit script checks (RegistryLayout.fence)
    ends_ms: int | None  # when this credential stops (expiry or grace), wall-clock ms

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def team(self) -> str:
        return self.entry.team


class RegistryCache:
    def __init__(
        self,
        backend: RegistryBackend,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.backend = backend
        self.poll_interval_s = poll_interval_s
        self._clock_ms = clock_ms
        self.version = -1  # nothing loaded yet
        self._keys: dict[str, KeyEntry] = {}
        self._teams: dict[str, TeamEntry] = {}
        self._by_hash: dict[str, CachedKey] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self._failing = False

    # -- the request path: memory only -----------------------------------------------------------
    def lookup(self, sha256: str) -> CachedKey | None:
        hit = self._by_hash.get(sha256)
        if hit is not None and hit.ends_ms is not None and self._clock_ms() >= hit.ends_ms:
            return None
        return hit

    def team(self, name: str) -> TeamEntry | None:
        return self._teams.get(name)

    @property
    def keys(self) -> dict[str, KeyEntry]:
        return self._keys

    @property
    def teams(self) -> dict[str, TeamEntry]:
        return self._teams

    # -- refreshing ------------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Catch up with the store if its version moved; True when something was reloaded.
        Every read happens before any change here, so a lookup never sees half a refresh."""
        async with self._lock:
            version = await self.backend.version()
            if version == self.version:
                return False
            if self.version < 0:
                snapshot = decode(await self.backend.load())
                self._keys, self._teams = snapshot.keys, snapshot.teams
                self._by_hash = {c.sha256: _cached(k, c) for k in self._keys.values() for c in k.credentials}
                self.version = snapshot.version
                return True
            keys = await self._changed("keys", KeyEntry)
            teams = await self._changed("teams", TeamEntry)
            for name, key in keys.items():
                self._replace_key(name, key)
            for name, team in teams.items():
                _put(self._teams, name, team)
            self.version = version
            return True

    async def _changed(self, kind: Kind, model: type[Entry]) -> dict[str, Entry | None]:
        """The entries written since our version, None for the deleted ones."""
        names = await self.backend.changed_since(kind, self.version)
        stored = await self.backend.entries(kind, names)
        result: dict[str, Entry | None] = dict.fromkeys(names)
        for name, (text, rev) in stored.items():
            try:
                result[name] = model.model_validate_json(text).model_copy(update={"rev": rev})
            except ValidationError:
                log.warning("registry %s %r is unreadable; ignored", kind[:-1], name)
        return result

    def _replace_key(self, name: str, entry: KeyEntry | None) -> None:
        old = self._keys.get(name)
        for credential in old.credentials if old is not None else ():
            self._by_hash.pop(credential.sha256, None)
        _put(self._keys, name, entry)
        if entry is not None:
            for credential in entry.credentials:
                self._by_hash[credential.sha256] = _cached(entry, credential)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="registry-cache")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_tasks([self._task], "registry poll")
            self._task = None

    async def _poll(self) -> None:
        while not self._stopping:  # also ends a poll whose cancellation a driver swallowed
            try:
                await self.refresh()
                if self._failing:
                    log.info("registry reachable again (version %d)", self.version)
                self._failing = False
            except StoreFailed as exc:
                if not self._failing:
                    log.warning("registry refresh failed (%s); serving version %d", exc.message, self.version)
                self._failing = True
            await asyncio.sleep(self.poll_interval_s)


def _put(entries: dict[str, Entry], name: str, entry: Entry | None) -> None:
    if entry is None:
        entries.pop(name, None)
    else:
        entries[name] = entry


def _cached(entry: KeyEntry, credential: Credential) -> CachedKey:
    return CachedKey(entry, credential.id, entry.ends_ms(credential))
