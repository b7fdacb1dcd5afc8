"""The store in Redis (standalone or Cluster): one EVALSHA per admit, per settle and per renew.

Time comes from Redis (`TIME` inside the scripts), so every replica agrees on it; a store built
with `clock_us` passes that clock's "now" instead (tests only). Every driver error is raised as
`StoreError` (`StoreUnreachable` for an admit that was certainly not sent); a NOSCRIPT (restart,
failover, SCRIPT FLUSH) reloads the script and retries once.

On a Redis Cluster (redis-py's `RedisCluster`) an EVALSHA goes to the master of its keys' slot
(all of one team's keys share the hash tag `{team}`), SCRIPT LOAD goes to every master, reads are
a pipeline split by slot, PING asks every master. MOVED and ASK are followed inside the driver;
a node that fails makes the call fail (no retries: the caller falls back) and the next call
re-reads the slot map. The cluster client opens one connection per command in flight and raises
rather than waits past its per-node cap, so calls beyond `CLUSTER_MAX_CONNECTIONS` queue here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from ..errors import RespConnectionError, RespReplyError, RespUnreachable, StoreError, StoreUnreachable
from . import scripts
from .layout import (
    DEFAULT_PREFIX,
    Layout,
    admit_args,
    decode_decision,
    decode_held,
    decode_peek,
    decode_settled,
    held_args,
    hold_args,
    peek_args,
    renew_args,
    settle_args,
)
from .ledger import usage_report
from .resp import RespClient
from .types import (
    Admission,
    Decision,
    HoldKind,
    Peek,
    Renewal,
    ScopeKind,
    ScopeLimits,
    Settled,
    Settlement,
    SharedHolds,
)

DEFAULT_TIMEOUT_MS = 250
DEFAULT_RETENTION_DAYS = 35
CLUSTER_MAX_CONNECTIONS = 100  # per master, and the store's calls in flight on a cluster
# what the driver raises when Redis cannot answer (RedisClusterException is no RedisError)
DRIVER_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError, RespConnectionError, RespReplyError)


T = TypeVar("T")
Client = aioredis.Redis | aioredis.RedisCluster


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Script:
    """One Lua file, loaded with SCRIPT LOAD and run with EVALSHA (reloaded on NOSCRIPT).

    Runs on the lean pipelined connection when the store has one (standalone Redis), else on
    redis-py (Redis Cluster, or a client handed in by a test)."""

    def __init__(self, name: str) -> None:
        self.source = scripts.source(name)
        self.sha: str | None = None

    async def __call__(
        self, client: Client, keys: list[str], args: list[str | int], scripts_connection: RespClient | None = None
    ) -> Any:
        if scripts_connection is not None:
            return await self._on_scripts_connection(scripts_connection, keys, args)
        if self.sha is None:
            self.sha = _text(await client.script_load(self.source))
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = _text(await client.script_load(self.source))
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    async def _on_scripts_connection(self, connection: RespClient, keys: list[str], args: list[str | int]) -> Any:
        deadline = connection.deadline()  # one timeout for the script, loading it included
        if self.sha is None:
            self.sha = _text(await connection.call("SCRIPT", "LOAD", self.source, deadline=deadline))
        try:
            return await connection.call("EVALSHA", self.sha, len(keys), *keys, *args, deadline=deadline)
        except RespReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            self.sha = _text(await connection.call("SCRIPT", "LOAD", self.source, deadline=deadline))
            return await connection.call("EVALSHA", self.sha, len(keys), *keys, *args, deadline=deadline)


class RedisStore:
    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        *,
        clock_us: Callable[[], int] | None = None,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        prefix: str = DEFAULT_PREFIX,
        scripts_connection: RespClient | None = None,
    ) -> None:
        self.client = client
        self.scripts_connection = scripts_connection  # the admit and settle scripts' own (standalone Redis)
        self.clock_us = clock_us
        self.retention_days = retention_days
        self.layout = Layout(prefix)
        self._admit = _Script(scripts.ADMIT)
        self._settle = _Script(scripts.SETTLE)
        self._renew = _Script(scripts.RENEW)
        self._hold = _Script(scripts.HOLD)
        self._held = _Script(scripts.HELD)
        self._in_flight: asyncio.Semaphore | None = None  # cluster calls holding a connection
        if isinstance(client, aioredis.RedisCluster):
            # RedisCluster raises MaxConnectionsError past its per-node cap instead of waiting
            self._in_flight = asyncio.Semaphore(client.connection_kwargs["max_connections"])
            self._queue_timeout_s = client.connection_kwargs.get("socket_timeout") or DEFAULT_TIMEOUT_MS / 1000

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        cluster: bool = False,
        clock_us: Callable[[], int] | None = None,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        prefix: str = DEFAULT_PREFIX,
    ) -> RedisStore:
        """A store on a new client with short timeouts and no hidden retries.

        `redis+cluster://` URLs (or `cluster=True`) build a RedisCluster client."""
        timeout = timeout_ms / 1000
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if url.startswith("redis+cluster://"):
            url, cluster = "redis://" + url.removeprefix("redis+cluster://"), True
        scripts_connection = None
        client: Client
        if cluster:
            client = aioredis.RedisCluster.from_url(url, max_connections=CLUSTER_MAX_CONNECTIONS, **options)
        else:
            # redis-py only reads here (reports, gauges, ping): one retry lets a pooled connection
            # that died with a Redis restart reconnect instead of failing the next read
            client = aioredis.Redis.from_url(url, retry_on_timeout=False, **{**options, "retry": Retry(NoBackoff(), 1)})
            scripts_connection = RespClient(url, timeout)
        return cls(
            client,
            clock_us=clock_us,
            retention_days=retention_days,
            prefix=prefix,
            scripts_connection=scripts_connection,
        )

    def _now_us(self) -> int | None:
        return None if self.clock_us is None else int(self.clock_us())

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        """await call(); on a cluster, once one of the client's connections is free (waiting up to
        the timeout). Standalone calls go straight through: the lean connection multiplexes."""
        if self._in_flight is None:
            return await call()
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await self._in_flight.acquire()
        except TimeoutError:
            raise StoreError(f"every Redis Cluster connection stayed busy for {self._queue_timeout_s}s") from None
        try:
            return await call()
        finally:
            self._in_flight.release()

    async def admit(self, admission: Admission) -> Decision:
        keys = self.layout.admit_keys(admission)
        args = admit_args(admission, self._now_us())
        try:
            reply = await self._run(lambda: self._admit(self.client, keys, args, self.scripts_connection))
        except RespUnreachable as exc:
            raise StoreUnreachable(f"admit not sent: {exc!r}") from exc
        except DRIVER_ERRORS as exc:
            raise StoreError(f"admit failed: {exc!r}") from exc
        return decode_decision(reply)

    async def peek(self, admission: Admission) -> Peek:
        """The admit script in its dry-run mode: its reads, none of its writes."""
        keys = self.layout.admit_keys(admission)
        args = peek_args(admission, self._now_us())
        try:
            reply = await self._run(lambda: self._admit(self.client, keys, args, self.scripts_connection))
        except DRIVER_ERRORS as exc:
            raise StoreError(f"peek failed: {exc!r}") from exc
        return decode_peek(reply, admission.windows)

    async def settle(self, settlement: Settlement) -> Settled:
        keys = self.layout.settle_keys(settlement)
        args = settle_args(settlement, self._now_us(), self.retention_days * 86_400)
        try:
            reply = await self._run(lambda: self._settle(self.client, keys, args, self.scripts_connection))
        except DRIVER_ERRORS as exc:
            raise StoreError(f"settle failed: {exc!r}") from exc
        return decode_settled(reply)

    async def renew(self, renewal: Renewal) -> bool:
        keys = self.layout.renew_keys(renewal)
        args = renew_args(renewal, self._now_us())
        try:
            reply = await self._run(lambda: self._renew(self.client, keys, args, self.scripts_connection))
        except DRIVER_ERRORS as exc:
            raise StoreError(f"renew failed: {exc!r}") from exc
        return bool(int(reply))

    async def hold(self, upstream: str, model: str, kind: HoldKind, hold_ms: int) -> int:
        keys = [self.layout.holds()]
        args = hold_args(upstream, model, kind, hold_ms, self._now_us())
        try:
            reply = await self._run(lambda: self._hold(self.client, keys, args, self.scripts_connection))
        except DRIVER_ERRORS as exc:
            raise StoreError(f"hold failed: {exc!r}") from exc
        return int(reply)

    async def holds(self) -> SharedHolds:
        keys = [self.layout.holds()]
        args = held_args(self._now_us())
        try:
            reply = await self._run(lambda: self._held(self.client, keys, args, self.scripts_connection))
        except DRIVER_ERRORS as exc:
            raise StoreError(f"holds failed: {exc!r}") from exc
        return decode_held(reply)

    async def usage(self, day: str, teams: list[str]) -> dict[str, Any]:
        """The day's ledger of `teams` (see `proxy.limits.ledger` for the shape)."""
        hashes = await self._read("usage", [("hgetall", self.layout.ledger(t, day)) for t in teams])
        ledgers = {t: {_text(f): int(v) for f, v in h.items()} for t, h in zip(teams, hashes, strict=True)}
        return usage_report(day, ledgers)

    async def budget_spent(
        self, day: str, teams_and_keys: Mapping[str, Iterable[str]]
    ) -> dict[tuple[ScopeKind, str], int]:
        """Real spend (settled, without reservations) on `day` of each team and of its keys,
        given as {team: [key, ...]}; keyed by ("team", name) and ("key", name)."""
        scopes = []
        for team, keys in teams_and_keys.items():
            scopes.append((team, ScopeLimits("team", team)))
            scopes += [(team, ScopeLimits("key", key)) for key in keys]
        values = await self._read("budget_spent", [("hget", self.layout.budget(t, s, day), "spent") for t, s in scopes])
        return {(s.kind, s.name): int(v or 0) for (_, s), v in zip(scopes, values, strict=True)}

    async def _read(self, op: str, commands: list[tuple[str, ...]]) -> list[Any]:
        """Several reads in one non-transactional pipeline (split by slot on a cluster)."""
        if not commands:
            return []

        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, *args in commands:
                    getattr(pipe, name)(*args)
                replies: list[Any] = await pipe.execute()
                return replies

        try:
            return await self._run(run)
        except DRIVER_ERRORS as exc:
            raise StoreError(f"{op} failed: {exc!r}") from exc

    async def ping(self) -> None:
        """Every master answers (on a cluster any of them may hold a team's limits)."""
        options = {} if self._in_flight is None else {"target_nodes": aioredis.RedisCluster.PRIMARIES}
        try:
            await self._run(lambda: self.client.ping(**options))
        except DRIVER_ERRORS as exc:
            raise StoreError(f"ping failed: {exc!r}") from exc

    async def close(self) -> None:
        if self.scripts_connection is not None:
            await self.scripts_connection.close()
        try:
            await self.client.aclose()
        except DRIVER_ERRORS as exc:
            raise StoreError(f"close failed: {exc!r}") from exc
