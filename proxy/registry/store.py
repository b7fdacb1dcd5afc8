"""The registry's storage seam: Redis (any replica count) or this process (MemoryStore setups).

Both answer the same small interface, `RegistryBackend`; the conformance tests run on both.
A write is conditional on the entry's revision and, atomically with it, bumps the registry version
and appends the audit record (Redis: `lua/write.lua`; here: the same steps under the event loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from .errors import Conflict, StoreFailed
from .layout import Kind, RegistryLayout

DEFAULT_TIMEOUT_MS = 500
AUDIT_RETENTION_MS = 90 * 86_400_000
FENCE_MARGIN_MS = 86_400_000  # a fence outlives the moment it starts refusing by a day
DRIVER_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

Fence = tuple[str, str, int | None]  # (team, credential id, refused from ms; None: lift the fence)


@dataclass
class RawSnapshot:
    """Entries as stored: name -> (JSON, rev), read after `version` (so never older than it)."""

    version: int
    keys: dict[str, tuple[str, int]] = field(default_factory=dict)
    teams: dict[str, tuple[str, int]] = field(default_factory=dict)


class RegistryBackend(Protocol):
    layout: RegistryLayout

    async def now_ms(self) -> int: ...
    async def version(self) -> int: ...
    async def load(self) -> RawSnapshot: ...
    async def changed_since(self, kind: Kind, version: int) -> list[str]: ...
    async def entries(self, kind: Kind, names: Sequence[str]) -> dict[str, tuple[str, int]]: ...
    async def write(
        self, kind: Kind, name: str, expected_rev: int | None, entry_json: str | None, audit_json: str, now_ms: int
    ) -> int: ...
    async def audit(self, limit: int) -> list[str]: ...
    async def set_fences(self, fences: Sequence[Fence], now_ms: int) -> None: ...
    async def close(self) -> None: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(values: dict[Any, Any], revs: dict[Any, Any]) -> dict[str, tuple[str, int]]:
    rev_of = {_text(k): int(v) for k, v in revs.items()}
    return {_text(k): (_text(v), rev_of.get(_text(k), 0)) for k, v in values.items()}


class RedisRegistryBackend:
    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, *, layout: RegistryLayout | None = None) -> None:
        self.client = client
        self.layout = layout or RegistryLayout()
        source = resources.files("proxy.registry").joinpath("lua", "write.lua").read_text(encoding="utf-8")
        self._write = client.register_script(source)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        cluster: bool = False,
        layout: RegistryLayout | None = None,
    ) -> RedisRegistryBackend:
        """A backend on its own client: short timeouts, no retry after a timeout (a write is not
        repeated blind); `redis+cluster://` (or `cluster=True`) builds a RedisCluster client."""
        timeout = timeout_ms / 1000
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if url.startswith("redis+cluster://"):
            url, cluster = "redis://" + url.removeprefix("redis+cluster://"), True
        if cluster:
            client: Any = aioredis.RedisCluster.from_url(url, **options)
        else:  # one retry on a connection error: a pooled connection that died with a restart
            client = aioredis.Redis.from_url(url, retry_on_timeout=False, **{**options, "retry": Retry(NoBackoff(), 1)})
        return cls(client, layout=layout)

    async def now_ms(self) -> int:
        try:
            seconds, micros = await self.client.time()
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        return int(seconds) * 1000 + int(micros) // 1000

    async def version(self) -> int:
        try:
            value = await self.client.get(self.layout.version)
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        return int(value or 0)

    async def load(self) -> RawSnapshot:
        try:
            version = int(await self.client.get(self.layout.version) or 0)  # first: never newer than the entries
            keys = await self.client.hgetall(self.layout.entries("keys"))
            key_revs = await self.client.hgetall(self.layout.revs("keys"))
            teams = await self.client.hgetall(self.layout.entries("teams"))
            team_revs = await self.client.hgetall(self.layout.revs("teams"))
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        return RawSnapshot(version, _entries(keys, key_revs), _entries(teams, team_revs))

    async def changed_since(self, kind: Kind, version: int) -> list[str]:
        """Names written (or deleted) after `version`."""
        try:
            names = await self.client.zrangebyscore(self.layout.changed(kind), f"({version}", "+inf")
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        return [_text(n) for n in names]

    async def entries(self, kind: Kind, names: Sequence[str]) -> dict[str, tuple[str, int]]:
        """name -> (JSON, rev) for those of `names` that exist."""
        if not names:
            return {}
        try:
            values = await self.client.hmget(self.layout.entries(kind), list(names))
            revs = await self.client.hmget(self.layout.revs(kind), list(names))
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        return {name: (_text(v), int(r or 0)) for name, v, r in zip(names, values, revs, strict=True) if v is not None}

    async def write(
        self, kind: Kind, name: str, expected_rev: int | None, entry_json: str | None, audit_json: str, now_ms: int
    ) -> int:
        args = [
            name,
            "" if expected_rev is None else expected_rev,
            entry_json or "",
            audit_json,
            now_ms,
            AUDIT_RETENTION_MS,
        ]
        try:
            done, value = await self._write(keys=self.layout.write_keys(kind), args=args)
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        if not int(done):
            raise Conflict(f"{kind[:-1]} {name!r} was changed by someone else; read it again")
        return int(value)

    async def audit(self, limit: int) -> list[str]:
        try:
            members = await self.client.zrevrangebyscore(self.layout.audit, "+inf", "-inf", start=0, num=limit)
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None
        return [_text(m).partition(" ")[2] for m in members]

    async def set_fences(self, fences: Sequence[Fence], now_ms: int) -> None:
        try:
            for team, credential_id, refused_from in fences:  # different teams: different slots
                name = self.layout.fence(team, credential_id)
                if refused_from is None:
                    await self.client.delete(name)
                else:
                    ttl = max(refused_from - now_ms, 0) + FENCE_MARGIN_MS
                    await self.client.set(name, refused_from, px=ttl)
        except DRIVER_ERRORS as exc:
            raise StoreFailed(f"the store did not answer ({type(exc).__name__})") from None

    async def close(self) -> None:
        await self.client.aclose()


class MemoryRegistryBackend:
    """The registry of a single process. `fences` (e.g. `MemoryStore`'s Keyspace, anything with
    `call(now_ms, command, *args)`) receives the fence keys, so its admit script can read them."""

    def __init__(
        self, *, clock_ms: Callable[[], int] | None = None, fences: Any = None, layout: RegistryLayout | None = None
    ) -> None:
        self.layout = layout or RegistryLayout()
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._fences = fences
        self._version = 0
        self._entries: dict[Kind, dict[str, tuple[str, int]]] = {"keys": {}, "teams": {}}
        self._changed: dict[Kind, dict[str, int]] = {"keys": {}, "teams": {}}
        self._audit: list[tuple[int, str]] = []  # (ms, json), oldest first

    async def now_ms(self) -> int:
        return self._clock_ms()

    async def version(self) -> int:
        return self._version

    async def load(self) -> RawSnapshot:
        return RawSnapshot(self._version, dict(self._entries["keys"]), dict(self._entries["teams"]))

    async def changed_since(self, kind: Kind, version: int) -> list[str]:
        return [name for name, at in self._changed[kind].items() if at > version]

    async def entries(self, kind: Kind, names: Sequence[str]) -> dict[str, tuple[str, int]]:
        stored = self._entries[kind]
        return {name: stored[name] for name in names if name in stored}

    async def write(
        self, kind: Kind, name: str, expected_rev: int | None, entry_json: str | None, audit_json: str, now_ms: int
    ) -> int:
        entries = self._entries[kind]
        current = entries[name][1] if name in entries else -1
        if (expected_rev is None and name in entries) or (expected_rev is not None and current != expected_rev):
            raise Conflict(f"{kind[:-1]} {name!r} was changed by someone else; read it again")
        self._version += 1
        if entry_json is None:
            entries.pop(name, None)
        else:
            entries[name] = (entry_json, self._version)
        self._changed[kind][name] = self._version
        self._audit.append((now_ms, audit_json))
        self._audit = [(at, record) for at, record in self._audit if at >= now_ms - AUDIT_RETENTION_MS]
        return self._version

    async def audit(self, limit: int) -> list[str]:
        newest_first = sorted(enumerate(self._audit), key=lambda item: (item[1][0], item[0]), reverse=True)
        return [record for _, (_, record) in newest_first[:limit]]

    async def set_fences(self, fences: Sequence[Fence], now_ms: int) -> None:
        if self._fences is None:
            return
        for team, credential_id, refused_from in fences:
            name = self.layout.fence(team, credential_id)
            if refused_from is None:
                self._fences.call(now_ms, "DEL", name)
            else:
                ttl = max(refused_from - now_ms, 0) + FENCE_MARGIN_MS
                self._fences.call(now_ms, "SET", name, str(refused_from), "PX", str(ttl))

    async def close(self) -> None:
        pass
