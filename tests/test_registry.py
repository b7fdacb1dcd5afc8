"""The runtime registry on a real Redis and in this process: one suite for both backends.

Keys and teams made at runtime (plain key shown once, only its sha256 stored), names unique across
the config file and the registry, rotation grace, expiry, revocation fences, the version every
replica polls, two caches ("replicas") catching up within a second, and an audit trail with no
secret in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from proxy.config import Limits
from proxy.limits.keyspace import Keyspace
from proxy.registry import (
    Conflict,
    KeyPatch,
    KeySpec,
    ManagedByConfig,
    MemoryRegistryBackend,
    NameTaken,
    NotFound,
    RedisRegistryBackend,
    Registry,
    RegistryBackend,
    RegistryCache,
    RegistryLayout,
    TeamPatch,
    TeamSpec,
    UnknownTeam,
)
from proxy.registry.store import AUDIT_RETENTION_MS

CONFIG_KEYS = ("ci-bot",)
CONFIG_TEAMS = ("platform",)
ADMIN = "ops-admin"


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Env:
    """One backend under test, plus how to make more (other replicas) and read a fence."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url
        self.keyspace = Keyspace()
        self.offset_ms = 0  # the memory backend's clock runs ahead by this much
        self.backends: list[RegistryBackend] = []
        self.memory = MemoryRegistryBackend(clock_ms=self.clock_ms, fences=self.keyspace)

    def clock_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def backend(self) -> RegistryBackend:
        if self.kind == "memory":
            return self.memory  # one process: every "replica" shares it
        assert self.url is not None
        backend = RedisRegistryBackend.from_url(self.url)
        self.backends.append(backend)
        return backend

    async def fence(self, team: str, credential_id: str) -> str | None:
        name = RegistryLayout().fence(team, credential_id)
        if self.kind == "memory":
            value = self.keyspace.call(self.clock_ms(), "GET", name)
            return value if isinstance(value, str) else None
        assert self.url is not None
        client = aioredis.Redis.from_url(self.url, decode_responses=True)
        try:
            return await client.get(name)
        finally:
            await client.aclose()

    async def close(self) -> None:
        for backend in self.backends:
            await backend.close()


@pytest.fixture(params=["redis", "memory"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    environment = Env(request.param, url)
    yield environment
    await environment.close()


def registry(env: Env, backend: RegistryBackend | None = None) -> Registry:
    return Registry(backend or env.backend(), config_keys=CONFIG_KEYS, config_teams=CONFIG_TEAMS)


async def cache_of(
    env: Env, backend: RegistryBackend | None = None, clock_ms: Callable[[], int] | None = None
) -> RegistryCache:
    cache = RegistryCache(backend or env.backend(), clock_ms=clock_ms or env.clock_ms)
    await cache.refresh()
    return cache


async def test_create_shows_the_key_once_and_stores_only_its_digest(env: Env) -> None:
    reg = registry(env)
    created = await reg.create_key(
        KeySpec(
            name="alice", team="platform", limits=Limits(rpm=60), models=["gpt-4o-mini"], metadata={"owner": "alice"}
        ),
        admin=ADMIN,
    )
    assert created.key.startswith("sk-proxy-") and len(created.key) > 40
    assert created.entry.credentials[0].sha256 == sha(created.key)
    raw = await reg.backend.load()
    stored = json.dumps([raw.keys, raw.teams])
    assert created.key not in stored and sha(created.key) in stored
    public = (await reg.get_key("alice")).public()
    assert public["source"] == "api" and public["limits"]["rpm"] == 60 and public["team"] == "platform"
    assert "credentials" not in public and sha(created.key) not in json.dumps(public)
    cache = await cache_of(env)
    hit = cache.lookup(sha(created.key))
    assert hit is not None and (hit.name, hit.team) == ("alice", "platform")
    assert [k.name for k in await reg.list_keys()] == ["alice"]


async def test_names_are_unique_across_config_and_runtime(env: Env) -> None:
    reg = registry(env)
    with pytest.raises(ManagedByConfig):
        await reg.create_key(KeySpec(name="ci-bot", team="platform"), admin=ADMIN)
    with pytest.raises(ManagedByConfig):
        await reg.update_key("ci-bot", KeyPatch(limits=Limits(rpm=1)), admin=ADMIN)
    with pytest.raises(ManagedByConfig):
        await reg.revoke_key("ci-bot", admin=ADMIN)
    with pytest.raises(ManagedByConfig):
        await reg.create_team(TeamSpec(name="platform"), admin=ADMIN)
    await reg.create_key(KeySpec(name="bob", team="platform"), admin=ADMIN)
    with pytest.raises(NameTaken):
        await reg.create_key(KeySpec(name="bob", team="platform"), admin=ADMIN)
    with pytest.raises(UnknownTeam):
        await reg.create_key(KeySpec(name="carol", team="nobody"), admin=ADMIN)
    with pytest.raises(NotFound):
        await reg.update_key("nobody", KeyPatch(), admin=ADMIN)


def test_names_that_would_break_store_keys_are_refused() -> None:
    for bad in ("{x}", "a:b", "", "_registry", "a b", "x" * 65):
        with pytest.raises(ValidationError):
            KeySpec(name=bad, team="platform")
        with pytest.raises(ValidationError):
            TeamSpec(name=bad)


async def test_runtime_teams_and_their_keys(env: Env) -> None:
    reg = registry(env)
    team = await reg.create_team(TeamSpec(name="research", limits=Limits(tpm=100_000)), admin=ADMIN)
    assert team.public()["limits"]["tpm"] == 100_000
    await reg.create_key(KeySpec(name="r1", team="research"), admin=ADMIN)
    updated = await reg.update_team("research", TeamPatch(limits=Limits(tpm=5)), admin=ADMIN)
    assert updated.limits.tpm == 5 and updated.rev > team.rev
    with pytest.raises(Conflict):
        await reg.delete_team("research", admin=ADMIN)  # it still has a key
    await reg.revoke_key("r1", admin=ADMIN)
    await reg.delete_team("research", admin=ADMIN)
    assert await reg.list_teams() == []
    cache = await cache_of(env)
    assert cache.team("research") is None


async def test_every_change_bumps_the_version(env: Env) -> None:
    reg = registry(env)
    backend = reg.backend
    versions = [await backend.version()]
    await reg.create_team(TeamSpec(name="t1"), admin=ADMIN)
    versions.append(await backend.version())
    await reg.create_key(KeySpec(name="k1", team="t1"), admin=ADMIN)
    versions.append(await backend.version())
    await reg.update_key("k1", KeyPatch(metadata={"a": "b"}), admin=ADMIN)
    versions.append(await backend.version())
    await reg.rotate_key("k1", 10, admin=ADMIN)
    versions.append(await backend.version())
    await reg.revoke_key("k1", admin=ADMIN)
    versions.append(await backend.version())
    assert versions == sorted(set(versions)) and len(versions) == 6
    with pytest.raises(NameTaken):
        await reg.create_team(TeamSpec(name="t1"), admin=ADMIN)
    assert await backend.version() == versions[-1]  # a refused change changes nothing


async def test_a_stale_update_is_refused(env: Env) -> None:
    reg = registry(env)
    await reg.create_key(KeySpec(name="k", team="platform"), admin=ADMIN)
    seen = await reg.get_key("k")
    await reg.update_key("k", KeyPatch(limits=Limits(rpm=10)), admin=ADMIN)
    with pytest.raises(Conflict):  # written on top of what `seen` said: lost update
        await reg.backend.write("keys", "k", seen.rev, "{}", "{}", await reg.backend.now_ms())
    assert (await reg.get_key("k")).limits.rpm == 10


async def test_update_changes_only_the_given_fields(env: Env) -> None:
    reg = registry(env)
    created = await reg.create_key(
        KeySpec(name="k", team="platform", limits=Limits(rpm=5), models=["m1"], metadata={"a": "1"}), admin=ADMIN
    )
    updated = await reg.update_key("k", KeyPatch(models=["m1", "m2"]), admin=ADMIN)
    assert (updated.limits.rpm, updated.models, updated.metadata) == (5, ["m1", "m2"], {"a": "1"})
    assert updated.credentials == created.entry.credentials
    cache = await cache_of(env)
    hit = cache.lookup(sha(created.key))
    assert hit is not None and hit.entry.models == ["m1", "m2"]


async def test_rotation_grace(env: Env) -> None:
    reg = registry(env)
    first = await reg.create_key(KeySpec(name="k", team="platform"), admin=ADMIN)
    offset = {"ms": 0}
    cache = await cache_of(env, clock_ms=lambda: env.clock_ms() + offset["ms"])
    rotated = await reg.rotate_key("k", 60, admin=ADMIN)
    assert rotated.key != first.key
    await cache.refresh()
    old, new = cache.lookup(sha(first.key)), cache.lookup(sha(rotated.key))
    assert old is not None and new is not None and old.ends_ms is not None and new.ends_ms is None
    assert 59_000 <= old.ends_ms - env.clock_ms() <= 60_000
    assert await env.fence("platform", old.credential_id) == str(old.ends_ms)
    assert await env.fence("platform", new.credential_id) is None
    offset["ms"] = 60_001  # the grace is over: only the new key works
    assert cache.lookup(sha(first.key)) is None and cache.lookup(sha(rotated.key)) is not None
    immediate = await reg.rotate_key("k", 0, admin=ADMIN)  # no grace: the previous key ends now
    await cache.refresh()
    offset["ms"] = 0
    assert cache.lookup(sha(rotated.key)) is None and cache.lookup(sha(immediate.key)) is not None


async def test_expired_keys_are_absent(env: Env) -> None:
    reg = registry(env)
    expires = datetime.now(UTC) + timedelta(hours=1)
    created = await reg.create_key(KeySpec(name="k", team="platform", expires_at=expires), admin=ADMIN)
    offset = {"ms": 0}
    cache = await cache_of(env, clock_ms=lambda: env.clock_ms() + offset["ms"])
    hit = cache.lookup(sha(created.key))
    assert hit is not None and hit.ends_ms == int(expires.timestamp() * 1000)
    assert await env.fence("platform", hit.credential_id) == str(hit.ends_ms)
    offset["ms"] = 3_600_000 + 1000
    assert cache.lookup(sha(created.key)) is None
    await reg.update_key("k", KeyPatch(expires_at=None), admin=ADMIN)  # extended: no end, no fence
    await cache.refresh()
    assert cache.lookup(sha(created.key)) is not None
    assert await env.fence("platform", hit.credential_id) is None


async def test_revoke_fences_every_credential_before_the_entry_goes(env: Env) -> None:
    reg = registry(env)
    first = await reg.create_key(KeySpec(name="k", team="platform"), admin=ADMIN)
    second = await reg.rotate_key("k", 600, admin=ADMIN)
    ids = [c.id for c in second.entry.credentials]
    assert len(ids) == 2
    await reg.revoke_key("k", admin=ADMIN)
    assert [await env.fence("platform", i) for i in ids] == ["0", "0"]
    cache = await cache_of(env)
    assert cache.lookup(sha(first.key)) is None and cache.lookup(sha(second.key)) is None
    with pytest.raises(NotFound):
        await reg.get_key("k")
    again = await reg.create_key(KeySpec(name="k", team="platform"), admin=ADMIN)  # the name is free
    assert await env.fence("platform", again.entry.credentials[0].id) is None


async def test_audit_trail_newest_first_without_secrets(env: Env) -> None:
    reg = registry(env)
    await reg.create_team(TeamSpec(name="research"), admin="root")
    created = await reg.create_key(KeySpec(name="k", team="research", limits=Limits(rpm=3)), admin="lead")
    await reg.update_key("k", KeyPatch(limits=Limits(rpm=4)), admin="lead")
    rotated = await reg.rotate_key("k", 30, admin="lead")
    await reg.revoke_key("k", admin="root")
    await reg.create_key(KeySpec(name="other", team="platform"), admin="root")
    records = await reg.audit(limit=10)
    assert [(r.action, r.target, r.admin) for r in records] == [
        ("create", "other", "root"),
        ("revoke", "k", "root"),
        ("rotate", "k", "lead"),
        ("update", "k", "lead"),
        ("create", "k", "lead"),
        ("create", "research", "root"),
    ]
    assert records[3].changes == {"limits": {"rpm": 4}}  # as sent: a patched field is replaced whole
    assert records[2].changes == {"grace_s": 30}
    assert [r.target for r in await reg.audit(limit=2)] == ["other", "k"]
    assert {r.team for r in await reg.audit(limit=10, team="research")} == {"research"}
    text = json.dumps(await reg.backend.audit(100))
    for secret in (created.key, rotated.key):
        assert secret not in text and sha(secret) not in text
    for credential in rotated.entry.credentials:
        assert credential.id not in text and credential.sha256 not in text


async def test_audit_keeps_ninety_days_in_memory() -> None:
    offset = {"ms": 0}
    backend = MemoryRegistryBackend(clock_ms=lambda: time.time_ns() // 1_000_000 + offset["ms"])
    reg = Registry(backend)
    await reg.create_team(TeamSpec(name="old"), admin=ADMIN)
    offset["ms"] = AUDIT_RETENTION_MS + 1000
    await reg.create_team(TeamSpec(name="new"), admin=ADMIN)
    assert [r.target for r in await reg.audit(limit=10)] == ["new"]


async def test_audit_retention_in_redis(redis_url: str) -> None:
    backend = RedisRegistryBackend.from_url(redis_url)
    try:
        now = await backend.now_ms()
        await backend.write("teams", "a", None, "{}", '{"n": 1}', now - AUDIT_RETENTION_MS - 1000)
        await backend.write("teams", "b", None, "{}", '{"n": 2}', now)
        assert await backend.audit(10) == ['{"n": 2}']
    finally:
        await backend.close()


async def test_two_replicas_see_a_new_and_a_revoked_key_within_a_second(env: Env) -> None:
    replicas = [RegistryCache(env.backend()), RegistryCache(env.backend())]
    for cache in replicas:
        await cache.refresh()
        cache.start()
    try:
        reg = registry(env)

        async def seconds_until(condition: Callable[[], bool]) -> float:
            started = time.monotonic()
            while not condition() and time.monotonic() - started < 5:
                await asyncio.sleep(0.01)
            return time.monotonic() - started

        created = await reg.create_key(KeySpec(name="fresh", team="platform"), admin=ADMIN)
        digest = sha(created.key)
        assert await seconds_until(lambda: all(c.lookup(digest) for c in replicas)) < 1.0
        await reg.revoke_key("fresh", admin=ADMIN)
        assert await seconds_until(lambda: not any(c.lookup(digest) for c in replicas)) < 1.0
    finally:
        for cache in replicas:
            await cache.stop()


async def test_a_refresh_fetches_only_what_changed(redis_url: str) -> None:
    backend = RedisRegistryBackend.from_url(redis_url)
    try:
        reg = Registry(backend, config_teams=CONFIG_TEAMS)
        for i in range(50):
            await reg.create_key(KeySpec(name=f"k{i}", team="platform"), admin=ADMIN)
        cache = RegistryCache(backend)
        await cache.refresh()
        before = dict(cache.keys)
        await reg.update_key("k7", KeyPatch(metadata={"x": "y"}), admin=ADMIN)
        fetched: list[list[str]] = []
        original = backend.entries

        async def spy(kind, names):  # type: ignore[no-untyped-def]
            fetched.append(list(names))
            return await original(kind, names)

        backend.entries = spy  # type: ignore[method-assign]
        assert await cache.refresh() is True
        assert fetched == [["k7"], []]
        assert all(cache.keys[n] is before[n] for n in before if n != "k7")
        assert cache.keys["k7"].metadata == {"x": "y"}
        assert await cache.refresh() is False  # same version: one GET, nothing else
        assert fetched == [["k7"], []]
        await reg.revoke_key("k8", admin=ADMIN)
        assert await cache.refresh() is True
        assert fetched[-2:] == [["k8"], []] and "k8" not in cache.keys and len(cache.keys) == 49
    finally:
        await backend.close()


FENCE_CHECK = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local refused_from = tonumber(redis.call('GET', KEYS[1]) or '')
if refused_from ~= nil and now_ms >= refused_from then return 'refused' end
return 'admitted'
"""


async def test_the_fence_check_for_admit_lua(redis_url: str) -> None:
    """The lines the admit script gains (see the report / layout.py): refused exactly from the
    moment revoke returns, and from the end of a rotation's grace, by Redis' clock."""
    backend = RedisRegistryBackend.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        reg = Registry(backend, config_teams=CONFIG_TEAMS)
        first = await reg.create_key(KeySpec(name="k", team="platform"), admin=ADMIN)
        fence = RegistryLayout().fence("platform", first.entry.credentials[0].id)
        assert await client.eval(FENCE_CHECK, 1, fence) == "admitted"
        await reg.rotate_key("k", 1, admin=ADMIN)
        assert await client.eval(FENCE_CHECK, 1, fence) == "admitted"  # within the grace
        await asyncio.sleep(1.1)
        assert await client.eval(FENCE_CHECK, 1, fence) == "refused"  # grace over
        current = (await reg.get_key("k")).credentials[0].id
        current_fence = RegistryLayout().fence("platform", current)
        assert await client.eval(FENCE_CHECK, 1, current_fence) == "admitted"
        await reg.revoke_key("k", admin=ADMIN)
        assert await client.eval(FENCE_CHECK, 1, current_fence) == "refused"
        assert 0 < await client.pttl(current_fence) <= 86_400_000
    finally:
        await client.aclose()
        await backend.close()


async def test_an_unreachable_store_keeps_the_last_copy(redis_url: str) -> None:
    backend = RedisRegistryBackend.from_url(redis_url)
    reg = Registry(backend, config_teams=CONFIG_TEAMS)
    created = await reg.create_key(KeySpec(name="k", team="platform"), admin=ADMIN)
    cache = RegistryCache(backend)
    await cache.refresh()
    await backend.close()
    dead = RedisRegistryBackend.from_url("redis://127.0.0.1:1/0", timeout_ms=200)
    cache.backend = dead
    from proxy.registry import StoreFailed

    with pytest.raises(StoreFailed):
        await cache.refresh()
    assert cache.lookup(sha(created.key)) is not None
    await dead.close()


async def test_on_a_redis_cluster(cluster_url: str) -> None:
    """The registry's keys share one slot (the write script is atomic); fences go to each team's."""
    backend = RedisRegistryBackend.from_url(cluster_url)
    other = RedisRegistryBackend.from_url(cluster_url)
    try:
        reg = Registry(backend, config_teams=CONFIG_TEAMS)
        await reg.create_team(TeamSpec(name="research"), admin=ADMIN)
        created = [
            await reg.create_key(KeySpec(name=f"k{i}", team=team), admin=ADMIN)
            for i, team in enumerate(["platform", "research"])
        ]
        cache = RegistryCache(other)
        await cache.refresh()
        assert all(cache.lookup(sha(c.key)) is not None for c in created)
        await reg.revoke_key("k1", admin=ADMIN)
        await cache.refresh()
        assert cache.lookup(sha(created[1].key)) is None and cache.lookup(sha(created[0].key)) is not None
        assert [r.action for r in await reg.audit(10)] == ["revoke", "create", "create", "create"]
    finally:
        await backend.close()
        await other.close()
