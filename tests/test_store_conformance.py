"""One suite over every store: RedisStore on real Redis, on a real 3-master Redis Cluster,
MemoryStore, RedisStore on fakeredis.

The stores run on a settable clock (`clock_us`), so no test sleeps. Redis still expires keys in
real time (PEXPIRE), from TTLs the scripts compute on the pinned clock; every key leaves a margin
past the moment its data says it ends (buckets, lease sets and reservations: 1 s; TTLs a test
reads across are seconds long), and the long random workload keeps its clock ahead of real time
(`Clock.keep_up`), so no test reads a key that real time expired but the pinned clock has not.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import random
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import fakeredis
import pytest
import redis.asyncio as aioredis
from lupa.lua51 import LuaError
from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from proxy.budgets.windows import label_of_day
from proxy.errors import StoreError
from proxy.limits import scripts
from proxy.limits.days import candidate_days
from proxy.limits.keyspace import Keyspace
from proxy.limits.layout import UNLIMITED
from proxy.limits.memory_store import MemoryStore, _Lua
from proxy.limits.redis_store import CLUSTER_MAX_CONNECTIONS, RedisStore
from proxy.limits.types import (
    Admission,
    BucketState,
    BudgetDay,
    BudgetState,
    Decision,
    QuotaLimits,
    Renewal,
    ScopeLimits,
    Settled,
    Settlement,
    TargetHold,
    Usage,
    WindowBudget,
)
from tests.support.ports import free_port

DAY_S = 86_400
# what the stores decide is the point here, not how fast a loaded machine answers: 150 concurrent
# calls queue for the cluster client's connections, and 2 s was not always enough under load
STORE_TIMEOUT_MS = 10_000
START = 19_675 * DAY_S  # 2023-11-14 00:00 UTC
DAYS = BudgetDay(
    ("2023-11-14", "2023-11-15", "2023-11-16"), (START, START + DAY_S, START + 2 * DAY_S, START + 3 * DAY_S)
)
T0_US = (START + DAY_S + 3600) * 1_000_000  # 2023-11-15 01:00


class Clock:
    def __init__(self, us: int = T0_US) -> None:
        self.us = us
        self._real_us = time.monotonic_ns() // 1000

    def __call__(self) -> int:
        return self.us

    def advance(self, ms: int) -> None:
        self.us += ms * 1000

    def keep_up(self) -> None:
        """Advance by the real time since the last call (or since the clock was made): a pinned
        clock that fell behind real time could still see a key that Redis has expired."""
        real_us = time.monotonic_ns() // 1000
        self.us += real_us - self._real_us
        self._real_us = real_us


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["redis", "cluster", "memory", "fakeredis"])
async def store(request, clock):
    if request.param in ("redis", "cluster"):
        url = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
        store = RedisStore.from_url(url, timeout_ms=STORE_TIMEOUT_MS, clock_us=clock)
    elif request.param == "memory":
        store = MemoryStore(clock_us=clock)
    else:
        client = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer(), lua_modules=set())
        store = RedisStore(client, clock_us=clock)
    yield store
    await store.close()


redis_only = pytest.mark.parametrize("store", ["redis", "cluster", "fakeredis"], indirect=True)
real_and_memory = pytest.mark.parametrize("store", ["redis", "cluster", "memory"], indirect=True)

_ids = itertools.count()


def key(name: str = "ci-bot", **limits) -> ScopeLimits:
    return ScopeLimits("key", name, **limits)


def team(name: str = "platform", **limits) -> ScopeLimits:
    return ScopeLimits("team", name, **limits)


def admission(k: ScopeLimits, t: ScopeLimits, tokens: int = 0, cost: int = 0, **kw) -> Admission:
    return Admission(kw.pop("request_id", f"req-{next(_ids)}"), t, k, tokens, cost, DAYS, **kw)


def settlement(a: Admission, prompt: int = 0, completion: int = 0, cost: int = 0, **kw) -> Settlement:
    kw.setdefault("day", "2023-11-15")
    kw.setdefault("model", "gpt-4o")
    return Settlement(
        a.request_id, a.team, a.key, usage=Usage(prompt, completion, kw.pop("cached", 0)), cost_micros=cost, **kw
    )


# -- request buckets ---------------------------------------------------------------------------

# (advance ms, admitted, retry_after_ms, remaining): rpm 60 (one a second), burst 3
BURST_STEPS = [
    (0, True, 0, 2),
    (0, True, 0, 1),
    (0, True, 0, 0),
    (0, False, 1000, 0),
    (999, False, 1, 0),
    (1, True, 0, 0),
    (0, False, 1000, 0),
    (2500, True, 0, 1),
    (0, True, 0, 0),
    (0, False, 500, 0),
]


async def test_burst_then_refusal_with_exact_retry(store, clock):
    k, t = key(rpm=60, rpm_burst=3), team()
    for step, (advance, admitted, retry, remaining) in enumerate(BURST_STEPS):
        clock.advance(advance)
        d = await store.admit(admission(k, t))
        assert (d.admitted, d.retry_after_ms, d.requests.remaining) == (admitted, retry, remaining), step
        assert d.requests.limit == 3
        if not admitted:
            assert (d.reason, d.scope, d.never_fits) == ("rpm", "key", False)


async def test_continuous_refill(store, clock):
    k, t = key(rpm=6), team()  # one request every 10 s, capacity 6
    for _ in range(6):
        assert (await store.admit(admission(k, t))).admitted
    d = await store.admit(admission(k, t))
    assert (d.admitted, d.retry_after_ms, d.requests) == (False, 10_000, BucketState(6, 0, 60_000))
    clock.advance(35_000)  # 3.5 requests back
    results = [(await store.admit(admission(k, t))) for _ in range(4)]
    assert [d.admitted for d in results] == [True, True, True, False]
    assert results[2].requests == BucketState(6, 0, 55_000)
    assert results[3].retry_after_ms == 5_000


async def test_key_and_team_both_apply(store):
    t = team(rpm=3)
    a, b = key("a", rpm=10), key("b", rpm=10)
    assert [(await store.admit(admission(k, t))).admitted for k in (a, a, b)] == [True] * 3
    for k in (a, b):
        d = await store.admit(admission(k, t))
        assert (d.admitted, d.reason, d.scope, d.retry_after_ms) == (False, "rpm", "team", 20_000)
        assert d.requests == BucketState(3, 0, 60_000)  # the tightest: the team's
    d = await store.admit(admission(key("c", rpm=1), team("other", rpm=3)))
    assert d.admitted and d.requests == BucketState(1, 0, 60_000)  # the key is tighter here


async def test_nothing_consumed_on_refusal(store):
    k, t = key(rpm=10, tpm=1000), team(max_parallel=1, budget_micros=1000)
    first = admission(k, t, tokens=100, cost=100)
    assert (await store.admit(first)).admitted
    d = await store.admit(admission(k, t, tokens=300, cost=300))
    assert (d.admitted, d.reason, d.scope, d.retry_after_ms) == (False, "parallel", "team", 1000)
    d = await store.admit(admission(k, t, tokens=300, cost=950))
    assert (d.admitted, d.reason, d.scope) == (False, "budget", "team")
    assert await store.settle(settlement(first, prompt=60, completion=40, cost=100))
    d = await store.admit(admission(k, t, tokens=100, cost=100))
    assert d.admitted
    assert d.requests == BucketState(10, 8, 12_000)
    assert d.tokens == BucketState(1000, 800, 12_000)
    assert (d.budget_spent_micros, d.budget_limit_micros) == (200, 1000)
    assert (d.key_committed_micros, d.team_committed_micros) == (None, 200)  # the key has no budget


# -- token buckets -----------------------------------------------------------------------------


async def test_settle_returns_unused_tokens(store):
    k, t = key(tpm=1000), team(tpm=5000)
    a = admission(k, t, tokens=600)
    d = await store.admit(a)
    assert d.tokens == BucketState(1000, 400, 36_000)
    assert await store.settle(settlement(a, prompt=100, completion=50))
    d = await store.admit(admission(k, t, tokens=850))
    assert d.admitted and d.tokens == BucketState(1000, 0, 60_000)  # 1000 - 150 - 850
    d = await store.admit(admission(k, t, tokens=1))
    assert (d.admitted, d.reason, d.scope, d.retry_after_ms) == (False, "tpm", "key", 60)


async def test_debt_when_actual_exceeds_reserved(store, clock):
    k, t = key(tpm=600), team()  # 10 tokens a second
    a = admission(k, t, tokens=100)
    assert (await store.admit(a)).admitted
    assert await store.settle(settlement(a, prompt=300, completion=600))  # 800 more than reserved
    d = await store.admit(admission(k, t, tokens=100))  # level -300: 400 tokens short
    assert (d.admitted, d.reason, d.retry_after_ms) == (False, "tpm", 40_000)
    assert d.tokens == BucketState(600, 0, 90_000)
    clock.advance(39_999)
    assert (await store.admit(admission(k, t, tokens=100))).retry_after_ms == 1
    clock.advance(1)
    d = await store.admit(admission(k, t, tokens=100))
    assert d.admitted and d.tokens == BucketState(600, 0, 60_000)


async def test_never_fits(store):
    d = await store.admit(admission(key(tpm=1000), team(tpm=10_000), tokens=1001))
    assert (d.admitted, d.reason, d.scope, d.never_fits, d.retry_after_ms) == (False, "tpm", "key", True, 0)
    d = await store.admit(admission(key(tpm=1000, tpm_burst=5000), team(tpm=2000), tokens=3000))
    assert (d.admitted, d.reason, d.scope, d.never_fits) == (False, "tpm", "team", True)
    d = await store.admit(admission(key(tpm=1000, tpm_burst=5000), team(tpm=2000), tokens=2000))
    assert d.admitted and d.tokens == BucketState(2000, 0, 60_000)


# -- parallel caps -----------------------------------------------------------------------------


async def test_parallel_cap_released_by_settle_and_lease_expiry(store, clock):
    k, t = key(max_parallel=2), team()
    r1, r2 = admission(k, t, lease_ttl_ms=5000), admission(k, t, lease_ttl_ms=5000)
    assert (await store.admit(r1)).admitted and (await store.admit(r2)).admitted
    d = await store.admit(admission(k, t))
    assert (d.admitted, d.reason, d.scope, d.retry_after_ms) == (False, "parallel", "key", 1000)
    assert await store.settle(settlement(r1))
    assert (await store.admit(admission(k, t, lease_ttl_ms=5000))).admitted
    assert not (await store.admit(admission(k, t))).admitted
    clock.advance(4999)
    assert not (await store.admit(admission(k, t))).admitted
    clock.advance(1)  # r2 and r3 died with their replica: their leases end
    assert (await store.admit(admission(k, t))).admitted
    assert (await store.admit(admission(k, t))).admitted
    assert not (await store.admit(admission(k, t))).admitted


def renewal(a: Admission, lease_ttl_ms: int = 5000) -> Renewal:
    return Renewal(a.request_id, a.team, a.key, "2023-11-15", lease_ttl_ms)


async def test_renewed_leases_outlive_the_ttl_until_settled(store, clock):
    k, t = key(max_parallel=1), team(max_parallel=5, budget_micros=1000)
    long = admission(k, t, tokens=10, cost=600, lease_ttl_ms=5000)
    assert (await store.admit(long)).admitted
    for _ in range(4):  # 16 s: three times the TTL
        clock.advance(4000)
        assert await store.renew(renewal(long))
        d = await store.admit(admission(k, t))
        assert (d.admitted, d.reason, d.scope) == (False, "parallel", "key")
        d = await store.admit(admission(key("other"), t, cost=401))
        assert (d.admitted, d.reason, d.budget_spent_micros) == (False, "budget", 600)  # the hold stays
    clock.advance(4999)  # the last renewal still holds...
    assert not (await store.admit(admission(k, t))).admitted
    assert await store.settle(settlement(long, cost=100))
    assert not await store.renew(renewal(long))  # ...until the settle: nothing left to renew
    d = await store.admit(admission(k, t, cost=900))
    assert (d.admitted, d.budget_spent_micros) == (True, 1000)


async def test_a_lease_that_ran_out_is_not_renewed(store, clock):
    k, t = key(max_parallel=1), team(budget_micros=1000)
    dead = admission(k, t, cost=600, lease_ttl_ms=5000)
    assert (await store.admit(dead)).admitted
    clock.advance(5000)  # its replica died: nothing renewed it in time
    assert not await store.renew(renewal(dead))
    d = await store.admit(admission(k, t, cost=1000))
    assert (d.admitted, d.budget_spent_micros) == (True, 1000)
    assert not await store.renew(renewal(admission(k, t)))  # never admitted


# -- budgets -----------------------------------------------------------------------------------


async def test_budget_reservation_refusal_and_real_cost(store, clock):
    k, t = key(budget_micros=1000), team(budget_micros=10_000)
    first = admission(k, t, cost=600)
    d = await store.admit(first)
    assert (d.admitted, d.budget_spent_micros, d.budget_limit_micros) == (True, 600, 1000)
    assert (d.day, d.day_reset_s) == ("2023-11-15", 23 * 3600)
    assert (d.key_committed_micros, d.team_committed_micros) == (600, 600)
    d = await store.admit(admission(k, t, cost=500))
    assert (d.admitted, d.reason, d.scope, d.never_fits) == (False, "budget", "key", False)
    assert (d.key_committed_micros, d.team_committed_micros) == (600, 600)  # each scope's, refused too
    assert d.retry_after_ms == 23 * 3600 * 1000  # the day's end
    assert (d.budget_spent_micros, d.budget_limit_micros) == (600, 1000)
    assert await store.settle(settlement(first, cost=200))
    assert await store.budget_spent("2023-11-15", {"platform": ["ci-bot"]}) == {
        ("team", "platform"): 200,
        ("key", "ci-bot"): 200,
    }
    d = await store.admit(admission(k, t, cost=500))
    assert (d.admitted, d.budget_spent_micros) == (True, 700)
    d = await store.admit(admission(k, t, cost=1001))
    assert (d.admitted, d.reason, d.never_fits) == (False, "budget", True)
    # a reservation held by a dead replica ends with its lease
    d = await store.admit(admission(k, t, cost=300, lease_ttl_ms=1000))
    assert (d.admitted, d.budget_spent_micros) == (True, 1000)
    assert not (await store.admit(admission(k, t, cost=1))).admitted
    clock.advance(1000)
    d = await store.admit(admission(k, t, cost=1))
    assert (d.admitted, d.budget_spent_micros) == (True, 701)


async def test_budget_day_rollover(store, clock):
    clock.us = (START + 2 * DAY_S - 1) * 1_000_000  # 2023-11-15 23:59:59
    k, t = key(budget_micros=1000), team()
    first = admission(k, t, cost=1000)
    d = await store.admit(first)
    assert (d.admitted, d.day, d.day_reset_s) == (True, "2023-11-15", 1)
    d = await store.admit(admission(k, t, cost=1))
    assert (d.admitted, d.reason, d.retry_after_ms) == (False, "budget", 1000)
    clock.advance(1000)
    d = await store.admit(admission(k, t, cost=1))
    assert (d.admitted, d.day, d.day_reset_s, d.budget_spent_micros) == (True, "2023-11-16", DAY_S, 1)
    assert await store.settle(settlement(first, cost=900, day="2023-11-15"))
    assert await store.budget_spent("2023-11-15", {"platform": ["ci-bot"]}) == {
        ("team", "platform"): 900,
        ("key", "ci-bot"): 900,
    }
    assert await store.budget_spent("2023-11-16", {"platform": ["ci-bot"]}) == {
        ("team", "platform"): 0,
        ("key", "ci-bot"): 0,
    }


# -- settlement --------------------------------------------------------------------------------


async def test_settle_is_idempotent(store):
    k, t = key(tpm=1000), team()
    a = admission(k, t, tokens=500, cost=50)
    assert (await store.admit(a)).admitted
    assert await store.settle(settlement(a, prompt=100, cost=40))
    before = await store.usage("2023-11-15", ["platform"])
    assert not await store.settle(settlement(a, prompt=100, cost=40))
    assert await store.usage("2023-11-15", ["platform"]) == before
    d = await store.admit(admission(k, t, tokens=0))
    assert d.tokens == BucketState(1000, 900, 6000)  # refunded once


def abandonment(a: Admission) -> Settlement:
    """What the limiter journals for an admit whose reply was lost and that went nowhere."""
    return settlement(a, succeeded=False, abandoned=True)


async def _held(store) -> list[str]:
    """Reservation records, parallel leases and budget holds still in the store."""
    return [name for name in await _ttls(store) if ":r:" in name or name.endswith((":par", ":leases"))]


async def test_abandon_releases_what_the_admit_reserved_and_books_nothing(store):
    k, t = key(tpm=1000, max_parallel=1, budget_micros=1000), team(max_parallel=1, budget_micros=5000)
    a = admission(k, t, tokens=500, cost=600)
    assert (await store.admit(a)).admitted
    abandoned = await store.settle(abandonment(a))
    assert abandoned == Settled(True, 0, 0, False, False)
    assert await _held(store) == []
    d = await store.admit(admission(k, t, tokens=100, cost=1000))  # slot, tokens and budget all back
    assert d.admitted and d.tokens == BucketState(1000, 900, 6000) and d.budget_spent_micros == 1000
    assert not await store.settle(abandonment(a)) and not await store.settle(settlement(a, cost=5))
    usage = (await store.usage("2023-11-15", ["platform"]))["teams"]["platform"]
    assert (usage["requests"], usage["spend_micros"]) == (0, 0)
    assert await store.budget_spent("2023-11-15", {"platform": ["ci-bot"]}) == {
        ("team", "platform"): 0,
        ("key", "ci-bot"): 0,
    }


@pytest.mark.parametrize("ended_by", ["settle", "abandon"])
async def test_an_admit_after_its_settle_or_abandon_changes_nothing(store, ended_by):
    """An admit that reaches the store after its request was settled (served by the fallback
    during an outage) or abandoned (its reply was lost) holds nothing: no slot, no request or
    token, no budget, no reservation record."""
    k, t = key(rpm=10, tpm=1000, max_parallel=1, budget_micros=2000), team(max_parallel=1)
    late = admission(k, t, tokens=500, cost=600)
    ended = settlement(late, prompt=3, completion=2, cost=7) if ended_by == "settle" else abandonment(late)
    assert await store.settle(ended)
    d = await store.admit(late)
    assert d.stale and not d.admitted
    assert await _held(store) == []
    d = await store.admit(admission(k, t, tokens=100, cost=1000))
    assert d.admitted and (d.requests.remaining, d.tokens.remaining) == (9, 900)
    assert d.budget_spent_micros == 1000 + ended.cost_micros
    d = await store.admit(admission(k, t))
    assert (d.admitted, d.reason) == (False, "parallel")  # the one slot is the new request's


async def test_late_settle_after_reservation_expired(store, clock):
    k, t = key(tpm=1000, max_parallel=1), team(budget_micros=1000)
    a = admission(k, t, tokens=500, cost=500, lease_ttl_ms=1000)
    assert (await store.admit(a)).admitted
    clock.advance(2000)
    assert await store.settle(settlement(a, prompt=10, completion=5, cost=123))
    team_usage = (await store.usage("2023-11-15", ["platform"]))["teams"]["platform"]
    assert (team_usage["spend_micros"], team_usage["requests"], team_usage["prompt_tokens"]) == (123, 1, 10)
    assert await store.budget_spent("2023-11-15", {"platform": ["ci-bot"]}) == {
        ("team", "platform"): 123,
        ("key", "ci-bot"): 123,
    }
    d = await store.admit(admission(k, t, tokens=0, cost=0))
    assert d.admitted and d.tokens == BucketState(1000, 533, 28_000)  # 500 + 2 s of refill, no refund
    assert d.budget_spent_micros == 123


async def test_ledger(store):
    t = team()
    a, b = key("a"), key("b")
    for k, model, tags, prompt, completion, cached, cost, written, reasoning in [
        (a, "gpt-4o", (("role", "x"), ("env", "ci")), 100, 20, 10, 1500, 0, 0),
        (a, "gpt-4o", (("role", "x"),), 50, 5, 0, 700, 0, 0),
        (a, "mini", (), 10, 1, 0, 3, 0, 0),
        (b, "mini", (("role", "y"),), 7, 2, 1, 4, 3, 1),  # every priced class is booked
    ]:
        adm = admission(k, t, tokens=500, cost=5000)
        assert (await store.admit(adm)).admitted
        usage = Usage(prompt, completion, cached, written, reasoning)
        done = settlement(adm, cost=cost, model=model, tags=tags)
        assert await store.settle(replace(done, usage=usage, end_user="u-7" if k is b else ""))
    failed = admission(b, t)
    assert (await store.admit(failed)).admitted
    assert await store.settle(settlement(failed, model="mini", succeeded=False))

    def m(spend, requests, prompt, completion, cached, written=0, reasoning=0):
        return {
            "spend_micros": spend,
            "requests": requests,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "cache_write_tokens": written,
            "reasoning_tokens": reasoning,
        }

    assert await store.usage("2023-11-15", ["platform", "nobody"]) == {
        "date": "2023-11-15",
        "teams": {
            "platform": {
                **m(2207, 5, 167, 28, 11, 3, 1),
                "keys": {
                    "a": {
                        **m(2203, 3, 160, 26, 10),
                        "models": {"gpt-4o": m(2200, 2, 150, 25, 10), "mini": m(3, 1, 10, 1, 0)},
                    },
                    "b": {**m(4, 2, 7, 2, 1, 3, 1), "models": {"mini": m(4, 2, 7, 2, 1, 3, 1)}},
                },
                "tags": {
                    "role=x": m(2200, 2, 150, 25, 10),
                    "env=ci": m(1500, 1, 100, 20, 10),
                    "role=y": m(4, 1, 7, 2, 1, 3, 1),
                },
                "end_users": {"u-7": m(4, 1, 7, 2, 1, 3, 1)},
            },
            "nobody": {**m(0, 0, 0, 0, 0), "keys": {}, "tags": {}, "end_users": {}},
        },
    }
    assert (await store.usage("2023-11-16", ["platform"]))["teams"]["platform"]["requests"] == 0


# -- Redis keys --------------------------------------------------------------------------------


async def _ttls(store) -> dict[str, int]:
    if isinstance(store, MemoryStore):
        now_ms = store.clock_us() // 1000
        return {name: store.keys.pttl(name, now_ms) for name in store.keys.names(now_ms)}
    return {name.decode(): await store.client.pttl(name) async for name in store.client.scan_iter(count=100)}


async def test_every_key_expires_and_shares_the_team_hash_tag(store, clock):
    t = team(rpm=100, tpm=10_000, max_parallel=10, budget_micros=10**9)
    for name in ("a", "b"):
        k = key(name, rpm=100, tpm=10_000, max_parallel=10, budget_micros=10**9)
        settled, open_ = admission(k, t, tokens=100, cost=10), admission(k, t, tokens=100, cost=10)
        assert (await store.admit(settled)).admitted and (await store.admit(open_)).admitted
        assert await store.settle(settlement(settled, 300, 10, 5, tags=(("role", "x"),)))
    late = admission(key("c"), team("other"))  # settled without its admission: created by settle
    assert await store.settle(settlement(late, 1, 1, 1, day="2023-11-14"))
    ttls = await _ttls(store)
    assert len(ttls) >= 12
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    platform = [name for name in ttls if "{platform}" in name]
    assert {key_slot(name.encode()) for name in platform} == {key_slot(b"{platform}")}
    assert all(name.startswith(("llmrl:{platform}:", "llmrl:{other}:")) for name in ttls)
    if isinstance(getattr(store, "client", None), RedisCluster):  # the cluster agrees: one slot, one master a team
        slots = {
            team: {await store.client.cluster_keyslot(n) for n in ttls if f"{{{team}}}" in n}
            for team in ("platform", "other")
        }
        assert slots == {"platform": {key_slot(b"{platform}")}, "other": {key_slot(b"{other}")}}
        masters = {team: store.client.get_node_from_key(f"{{{team}}}").name for team in slots}
        assert masters["platform"] != masters["other"]  # so the scan above read more than one master


async def test_ledger_lives_for_the_retention(store):
    a = admission(key(), team())
    assert await store.settle(settlement(a, cost=1))
    ttls = await _ttls(store)
    ledger = ttls["llmrl:{platform}:ledger:2023-11-15"]
    assert 35 * 86_400_000 - 5000 < ledger <= 35 * 86_400_000


# -- atomicity, scripts, outages ---------------------------------------------------------------


@real_and_memory
async def test_concurrent_admits_are_atomic(store):
    # more calls at once than the cluster client's connections per node (it raises past them)
    k, t = key(rpm=1, rpm_burst=137), team(rpm=1000)
    decisions = await asyncio.gather(*(store.admit(admission(k, t)) for _ in range(2 * CLUSTER_MAX_CONNECTIONS + 50)))
    assert sum(d.admitted for d in decisions) == 137


@redis_only
async def test_script_reloaded_after_flush(store):
    assert (await store.admit(admission(key(rpm=10), team()))).admitted
    await store.client.script_flush()
    assert (await store.admit(admission(key(rpm=10), team()))).admitted
    a = admission(key(), team())
    await store.client.script_flush()
    assert await store.settle(settlement(a))


async def test_a_script_error_names_the_line_of_its_own_file(redis_url):
    """The prelude shares each script's first line, so Redis and the in-process Lua both name an
    error on line 3 of a script file line 3 (and the prelude's `named` is in scope)."""
    source = scripts.assemble("-- a script\nlocal args = named({'a'}, ARGV)\nreturn args.missing + 1\n")
    client = aioredis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ResponseError, match=r":3: attempt to perform arithmetic on field 'missing'"):
            await client.eval(source, 0, "1")
    finally:
        await client.aclose()
    lua = _Lua(Keyspace())
    function = lua._compile(source)
    with pytest.raises(LuaError, match=r":3: attempt to perform arithmetic on field 'missing'"):
        function(lua.runtime.table_from([]), lua.runtime.table_from(["1"]))


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_unreachable_redis_raises_store_error(scheme):
    store = RedisStore.from_url(f"{scheme}://127.0.0.1:{free_port()}/0", timeout_ms=200)
    try:
        with pytest.raises(StoreError):
            await store.admit(admission(key(rpm=1), team()))
        with pytest.raises(StoreError):
            await store.settle(settlement(admission(key(), team())))
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.usage("2023-11-15", ["platform"])
        with pytest.raises(StoreError):
            await store.budget_spent("2023-11-15", {"platform": ["ci-bot"]})
    finally:
        await store.close()


async def test_redis_outage_raises_store_error_then_recovers(redis_server, redis_url):
    store = RedisStore.from_url(redis_url, timeout_ms=500)
    try:
        assert (await store.admit(admission(key(rpm=10), team()))).admitted
        redis_server.kill()
        try:
            with pytest.raises(StoreError):
                await store.admit(admission(key(rpm=10), team()))
            with pytest.raises(StoreError):
                await store.budget_spent("2023-11-15", {"platform": []})
        finally:
            redis_server.start()
        await store.ping()
        assert (await store.admit(admission(key(rpm=10), team()))).admitted
    finally:
        await store.close()


async def test_cluster_master_outage_fails_its_teams_only_then_recovers(redis_cluster, cluster_url):
    store = RedisStore.from_url(cluster_url, timeout_ms=500)
    try:
        assert (await store.admit(admission(key(rpm=10), team()))).admitted
        down = store.client.get_node_from_key("{platform}").port
        assert store.client.get_node_from_key("{other}").port != down
        redis_cluster.kill(down)
        try:
            with pytest.raises(StoreError):
                await store.admit(admission(key(rpm=10), team()))
            with pytest.raises(StoreError):
                await store.ping()  # every master must answer
            assert (await store.admit(admission(key("c", rpm=10), team("other")))).admitted
        finally:
            redis_cluster.restart(down)
        await store.ping()
        assert (await store.admit(admission(key(rpm=10), team()))).admitted
    finally:
        await store.close()


async def test_stores_agree_on_a_random_workload(request, redis_url):
    """The same random admits, settles and clock steps give the same replies and ledger everywhere."""
    clock = Clock()
    fake = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer(), lua_modules=set())
    stores = [RedisStore.from_url(redis_url, timeout_ms=STORE_TIMEOUT_MS, clock_us=clock)]
    try:  # and the cluster, where there is one
        stores.append(
            RedisStore.from_url(request.getfixturevalue("cluster_url"), timeout_ms=STORE_TIMEOUT_MS, clock_us=clock)
        )
    except pytest.skip.Exception:
        pass
    stores += [RedisStore(fake, clock_us=clock), MemoryStore(clock_us=clock)]

    async def each(method: str, argument: object) -> list:
        """One call on every store at once: each reaches its keys within moments of `keep_up`,
        not after the other stores' round trips (one after the other, a step on loaded cores could
        outlast the keys' 1 s margin, and Redis expire a key the pinned clock still counted)."""
        return list(await asyncio.gather(*(getattr(s, method)(argument) for s in stores)))

    rng = random.Random(7)
    t = team(rpm=40, rpm_burst=50, tpm=20_000, max_parallel=6, budget_micros=400_000)
    keys = [
        key("a", rpm=20, tpm=9_000, tpm_burst=12_000, max_parallel=3, budget_micros=250_000),
        key("b", rpm=12, rpm_burst=3),
    ]
    open_, ended, history = [], [], []
    try:
        kinds = {None, "rpm", "tpm", "parallel", "budget"}
        # 300 steps, and on until the workload has met every kind of refusal (which ones 300 steps
        # meet depends on the real time they take: the clock keeps up with it)
        for step in range(1200):
            if step >= 300 and {d.reason for d in history if isinstance(d, Decision)} >= kinds:
                break
            clock.keep_up()  # between steps: every store sees the same "now" within a step
            roll = rng.random()
            if roll < 0.5:
                a = admission(
                    rng.choice(keys),
                    t,
                    tokens=rng.randrange(0, 4000),
                    cost=rng.randrange(0, 30_000),
                    lease_ttl_ms=rng.choice([2_000, 60_000]),
                )
                decisions = await each("admit", a)
                if decisions[0].admitted:
                    open_.append(a)
            elif roll < 0.8 and open_:
                a = open_.pop(rng.randrange(len(open_)))
                st = settlement(
                    a,
                    rng.randrange(0, 3000),
                    rng.randrange(0, 2000),
                    rng.randrange(0, 30_000),
                    tags=(("role", rng.choice("xy")),),
                )
                decisions = await each("settle", st)
                ended.append(a)
            elif roll < 0.85 and open_:
                a = open_.pop(rng.randrange(len(open_)))
                decisions = await each("settle", abandonment(a))
                ended.append(a)
            elif roll < 0.88 and ended:  # an admit arriving after its settle or abandon
                a = rng.choice(ended)
                decisions = await each("admit", a)
                assert decisions[0].stale
            else:
                clock.advance(rng.randrange(0, 5000))
                continue
            assert decisions[1:] == decisions[:-1], decisions
            history.append(decisions[0])
        reports = [await s.usage("2023-11-15", ["platform"]) for s in stores]
        assert reports[1:] == reports[:-1]
        assert {d.reason for d in history if isinstance(d, Decision)} == kinds
    finally:
        for s in stores:
            await s.close()


# -- budget alert threshold ----------------------------------------------------------------------


async def test_alert_threshold_is_crossed_once_per_scope_and_day(store, clock):
    k = key(budget_micros=5000, alert_micros=800)
    t = team(budget_micros=10_000, alert_micros=1500)
    results = []
    for cost in (500, 299, 1, 400, 600, 5):
        a = admission(k, t, cost=0)
        assert (await store.admit(a)).admitted
        results.append(await store.settle(settlement(a, cost=cost)))
    assert [r.key_spent_micros for r in results] == [500, 799, 800, 1200, 1800, 1805]
    assert [r.key_crossed for r in results] == [False, False, True, False, False, False]
    assert [r.team_crossed for r in results] == [False, False, False, False, True, False]
    duplicate = await store.settle(settlement(a, cost=5))
    assert not duplicate and not duplicate.key_crossed
    # the next day starts below the threshold again
    clock.advance(DAY_S * 1000)
    late = admission(k, t)
    assert (await store.admit(late)).admitted
    result = await store.settle(settlement(late, cost=900, day="2023-11-16"))
    assert (result.key_spent_micros, result.key_crossed) == (900, True)


async def test_settled_markers_live_minutes_not_days(store, clock):
    """One marker per settled request: it must not outlive the dedup window (soak: 2-day markers
    grew Redis by one key per request for two days)."""
    from proxy.limits.layout import DONE_TTL_S

    a = admission(key(), team())
    assert (await store.admit(a)).admitted
    assert await store.settle(settlement(a))
    markers = {name: ttl for name, ttl in (await _ttls(store)).items() if ":d:" in name}
    assert len(markers) == 1 and 0 < next(iter(markers.values())) <= DONE_TTL_S * 1000
    clock.advance(DONE_TTL_S * 1000 - 1)
    assert not await store.settle(settlement(a))  # still remembered within the window


async def test_tags_past_the_ledger_cap_fold_into_overflow(store, monkeypatch):
    from proxy.limits import layout

    monkeypatch.setattr(layout, "LEDGER_MAX_FIELDS", 56)  # the team, key, model and 5 tags of 7 fields each
    k, t = key(), team()
    for n in range(12):
        a = admission(k, t)
        assert (await store.admit(a)).admitted
        assert await store.settle(settlement(a, cost=1, tags=(("user", f"u{n}"),)))
    a = admission(k, t)
    assert (await store.admit(a)).admitted
    assert await store.settle(settlement(a, cost=1, tags=(("user", "u0"),)))  # an existing tag still books
    tags = (await store.usage("2023-11-15", ["platform"]))["teams"]["platform"]["tags"]
    assert set(tags) == {"user=u0", "user=u1", "user=u2", "user=u3", "user=u4", "other=overflow"}
    assert tags["user=u0"]["requests"] == 2 and tags["other=overflow"]["requests"] == 7
    assert sum(line["spend_micros"] for line in tags.values()) == 13


# -- window budgets: every window of every scope, in the same admission -------------------------


def window_days(at: datetime) -> BudgetDay:
    """The candidate days a replica whose clock reads `at` offers (yesterday, today, tomorrow)."""
    return candidate_days(ZoneInfo("UTC"), at)


def on_cluster(store) -> bool:
    return isinstance(getattr(store, "client", None), RedisCluster)


async def admit_window(
    store, days: BudgetDay, windows: tuple[WindowBudget, ...], cost: int, team_name: str = "platform"
):
    a = Admission(f"req-{next(_ids)}", team(team_name), key(), 0, cost, days, windows=windows)
    return a, await store.admit(a)


async def settle_window(store, a: Admission, decision: Decision, cost: int) -> Settled:
    return await store.settle(
        Settlement(a.request_id, a.team, a.key, "gpt-4o", decision.day, Usage(), cost, windows=a.windows)
    )


@pytest.mark.parametrize(
    ("window", "last_minute", "boundary"),
    [
        ("week", datetime(2023, 11, 19, 23, 59, tzinfo=UTC), "2023-W47"),  # Sunday -> Monday
        ("month", datetime(2023, 11, 30, 23, 59, tzinfo=UTC), "2023-12"),  # Nov 30 -> Dec 1
    ],
)
async def test_a_window_budget_holds_to_the_boundary_then_starts_afresh(store, clock, window, last_minute, boundary):
    """The window follows the store's clock: a replica still offering the old day's candidates
    after the boundary has its request booked in the new window, which starts from zero."""
    clock.us = int(last_minute.timestamp()) * 1_000_000
    days = window_days(last_minute)
    windows = (WindowBudget("team", "platform", window, 100),)
    a, first = await admit_window(store, days, windows, 60)
    assert first.admitted
    assert (await settle_window(store, a, first, 60)).window_spent_micros == (60,)
    _, refused = await admit_window(store, days, windows, 60)
    assert (refused.admitted, refused.scope, refused.reason, refused.window) == (False, "window", "budget", 0)
    assert (refused.window_spent_micros, refused.window_limit_micros) == (60, 100)
    clock.advance(60_000)  # the store's clock passes the boundary; the replica's candidates do not move
    a, fresh = await admit_window(store, days, windows, 60)
    assert fresh.admitted and label_of_day(window, fresh.day) == boundary
    assert (await settle_window(store, a, fresh, 60)).window_spent_micros == (60,)


async def test_every_window_budget_of_every_scope_is_checked_and_booked(store, clock):
    """Day, week and month budgets of the team, the key and an end user, and the org's: the
    tightest refuses, and settlement books the cost in each."""
    now = datetime.fromtimestamp(clock() / 1e6, UTC)
    windows = (
        WindowBudget("team", "platform", "week", 1000),
        WindowBudget("key", "ci-bot", "month", 1000),
        WindowBudget("end_user", "user-7", "day", 150),
        WindowBudget("team", "platform", "month", 1000),
    )
    if not on_cluster(store):  # an org budget needs standalone Redis (config refuses it on a cluster)
        windows += (WindowBudget("org", "", "month", 1000),)
    a, decision = await admit_window(store, window_days(now), windows, 100)
    assert decision.admitted
    assert decision.windows_committed_micros == (100,) * len(windows)  # each one's spent + held, this hold too
    settled = await settle_window(store, a, decision, 100)
    assert settled.window_spent_micros == (100,) * len(windows)
    a, decision = await admit_window(store, window_days(now), windows, 40)
    assert decision.admitted and decision.windows_committed_micros == (140,) * len(windows)
    assert (await settle_window(store, a, decision, 20)).window_spent_micros == (120,) * len(windows)
    _, refused = await admit_window(store, window_days(now), windows, 100)
    assert (refused.admitted, refused.window, refused.window_spent_micros) == (False, 2, 120)
    assert refused.windows_committed_micros == (120,) * len(windows)  # each one's, refused too
    other_user = (*windows[:2], WindowBudget("end_user", "user-8", "day", 150), *windows[3:])
    _, admitted = await admit_window(store, window_days(now), other_user, 100)
    assert admitted.admitted  # another end user of the same team has a budget of its own


async def test_a_shadow_budget_never_refuses_but_says_it_would_have(store, clock):
    now = datetime.fromtimestamp(clock() / 1e6, UTC)
    windows = (
        WindowBudget("team", "platform", "week", 1_000),
        WindowBudget("key", "ci-bot", "month", 50, enforce=False),
    )
    a, decision = await admit_window(store, window_days(now), windows, 100)
    assert (decision.admitted, decision.shadow) == (True, (1,))
    assert (await settle_window(store, a, decision, 100)).window_spent_micros == (100, 100)


@real_and_memory
async def test_a_window_budget_is_exact_under_100_concurrent_admissions(store, clock):
    """100 end users' worth of racing on one end user's day budget and a team's month budget:
    exactly as many admitted as fit, and the booked spend is the budget."""
    now = datetime.fromtimestamp(clock() / 1e6, UTC)
    windows = (WindowBudget("end_user", "racer", "day", 1_000), WindowBudget("team", "platform", "month", 5_000))
    days = window_days(now)

    async def one() -> bool:
        a, decision = await admit_window(store, days, windows, 10)
        if decision.admitted:
            await settle_window(store, a, decision, 10)
        return decision.admitted

    admitted = await asyncio.gather(*(one() for _ in range(150)))
    assert sum(admitted) == 100
    a, last = await admit_window(store, days, (WindowBudget("end_user", "racer", "day", 10**9),), 0)
    assert (await settle_window(store, a, last, 0)).window_spent_micros == (1_000,)


async def test_window_holds_are_released_by_an_abandoned_admission_and_renewed_with_the_request(store, clock):
    now = datetime.fromtimestamp(clock() / 1e6, UTC)
    windows = (WindowBudget("team", "platform", "month", 100),)
    a, decision = await admit_window(store, window_days(now), windows, 100)
    assert decision.admitted
    clock.advance(800_000)
    assert await store.renew(Renewal(a.request_id, a.team, a.key, decision.day, 900_000, windows))
    clock.advance(800_000)  # past the first lease, within the renewed one: still held
    assert not (await admit_window(store, window_days(now), windows, 100))[1].admitted
    abandoned = Settlement(
        a.request_id, a.team, a.key, "", decision.day, Usage(), 0, abandoned=True, succeeded=False, windows=windows
    )
    assert (await store.settle(abandoned)).window_spent_micros == (0,)
    assert (await admit_window(store, window_days(now), windows, 100))[1].admitted


def end_user(name: str, **limits) -> ScopeLimits:
    return ScopeLimits("end_user", name, **limits)


async def test_each_end_user_has_limits_of_its_own(store, clock):
    """The team's end-user limits apply to each end user separately, in the same admission."""
    ann, bob = end_user("ann", rpm=2, max_parallel=1), end_user("bob", rpm=2, max_parallel=1)
    first = admission(key(), team(), user=ann)
    assert (await store.admit(first)).admitted
    refused = await store.admit(admission(key(), team(), user=ann))
    assert (refused.admitted, refused.reason, refused.scope) == (False, "parallel", "end_user")
    assert (await store.admit(admission(key(), team(), user=bob))).admitted  # another end user
    assert await store.settle(replace(settlement(first), user=ann))  # releases ann's slot
    second = admission(key(), team(), user=ann)
    assert (await store.admit(second)).admitted
    assert await store.settle(replace(settlement(second), user=ann))
    refused = await store.admit(admission(key(), team(), user=ann))  # two a minute, both used
    assert (refused.admitted, refused.reason, refused.scope, refused.retry_after_ms) == (
        False,
        "rpm",
        "end_user",
        30_000,
    )


async def test_an_end_users_tokens_are_refunded_at_settlement(store, clock):
    ann = end_user("ann", tpm=1000)
    a = admission(key(), team(), tokens=800, user=ann)
    assert (await store.admit(a)).admitted
    assert (await store.admit(admission(key(), team(), tokens=300, user=ann))).scope == "end_user"
    assert await store.settle(replace(settlement(a, prompt=50, completion=50), user=ann))  # 700 back
    assert (await store.admit(admission(key(), team(), tokens=800, user=ann))).admitted


async def test_limits_in_shadow_mode_never_refuse_but_say_what_they_would_have_refused(store, clock):
    k = key(rpm=60, rpm_burst=1, tpm=100, max_parallel=1, enforce=False)
    decisions = [await store.admit(admission(k, team(), tokens=60)) for _ in range(3)]
    assert [d.admitted for d in decisions] == [True, True, True]
    assert [d.shadow_limits for d in decisions] == [
        (),
        ("key:rpm", "key:tpm", "key:parallel"),
        ("key:rpm", "key:tpm", "key:parallel"),
    ]
    enforced = await store.admit(admission(key("other", rpm=60, rpm_burst=1), team()))
    assert enforced.admitted and not enforced.shadow_limits
    assert not (await store.admit(admission(key("other", rpm=60, rpm_burst=1), team()))).admitted


# -- the revocation fence of runtime keys -----------------------------------------------------


async def _set_raw(store, name: str, value: str) -> None:
    if isinstance(store, MemoryStore):
        store.keys.call(store.clock_us() // 1000, "SET", name, value)
    else:
        await store.client.set(name, value)


async def test_a_fenced_credential_is_refused_and_its_reply_decodes_whole(store, clock):
    """The fence's early reply has the whole admit reply's shape (a shorter one broke decoding
    once the reply grew): the decision says `revoked` by the key, and nothing was consumed."""
    await _set_raw(store, store.layout.fence("platform", "cred-1"), "0")
    fenced = await store.admit(admission(key(rpm=10, rpm_burst=1), team(), credential_id="cred-1"))
    assert (fenced.admitted, fenced.reason, fenced.scope, fenced.never_fits) == (False, "revoked", "key", True)
    other = await store.admit(admission(key(rpm=10, rpm_burst=1), team(), credential_id="cred-2"))
    assert other.admitted and other.requests is not None and other.requests.remaining == 0


# -- peeks (`GET /v1/me`): the admit script's dry run -------------------------------------------

PEEKED = {"rpm": 6, "rpm_burst": 10, "tpm": 6000, "max_parallel": 3}  # one request per 10 s, 0.1 token a ms


def peek_scopes(scope: str, on_a_cluster: bool) -> Admission:
    """A key, team and end user where only `scope` has limits (so every figure an admit reports is
    its own), with a budget of 1,000 micros (an end user's is a window budget), and window budgets
    of the other scopes, one of them in shadow mode."""
    budget = {"budget_micros": 1000}
    limited = {name: (PEEKED | budget if name == scope else {}) for name in ("key", "team")}
    user = end_user("ann", **PEEKED) if scope == "end_user" else end_user("ann")
    windows = (
        WindowBudget("team", "platform", "week", 5000),
        WindowBudget("key", "ci-bot", "month", 4000),
        WindowBudget("end_user", "ann", "day", 1000 if scope == "end_user" else 3000),
        WindowBudget("key", "ci-bot", "day", 90, enforce=False),
    )
    if not on_a_cluster:  # an org budget needs standalone Redis
        windows += (WindowBudget("org", "", "month", 9000),)
    return admission(key(**limited["key"]), team(**limited["team"]), windows=windows, user=user)


async def peek_history(store, clock, scope: str) -> Admission:
    """A settled request (unused tokens refunded), a request whose lease expired (its parallel
    slot and budget holds due for release), one still in flight, and time for the buckets to
    refill part of the way; returns the peek's admission (nothing asked, nothing reserved)."""
    base = peek_scopes(scope, on_cluster(store))
    settled = replace(base, request_id="req-settled", tokens=3000, cost_micros=100)
    assert (await store.admit(settled)).admitted
    usage = replace(settlement(settled, 500, 500, 60), windows=base.windows, end_user="ann", user=base.user)
    assert await store.settle(usage)  # 2000 tokens back, 60 spent
    expiring = replace(base, request_id="req-expiring", tokens=1000, cost_micros=150, lease_ttl_ms=5000)
    assert (await store.admit(expiring)).admitted
    assert (await store.admit(replace(base, request_id="req-open", tokens=500, cost_micros=50))).admitted
    clock.advance(6000)  # the expiring request's lease and holds have run out; 0.6 requests, 600 tokens back
    return replace(base, request_id="peek")


def state_of(peek, scope: str):
    return {"key": peek.key, "team": peek.team, "end_user": peek.user}[scope]


@pytest.mark.parametrize("scope", ["key", "team", "end_user"])
async def test_a_peek_reads_what_the_next_admit_sees(store, clock, scope):
    """A peek's figures are the admit's own: a request one token or one micro beyond what the peek
    says remains is refused, reporting the same buckets and committed spend; one that takes
    exactly what remains is admitted; and exactly the free leases it reports can still open."""
    peeked = await peek_history(store, clock, scope)
    peek = await store.peek(peeked)
    mine = state_of(peek, scope)
    assert (peek.day, peek.revoked) == ("2023-11-15", False)
    assert mine.requests == BucketState(10, 7, 24_000)  # 10 - 3 + 0.6, full in 2.4 requests' time
    assert mine.tokens == BucketState(6000, 4100, 19_000)  # 6000 - 3000 + 2000 - 1000 - 500 + 600
    assert (mine.max_parallel, mine.in_flight, mine.free_leases) == (3, 1, 2)
    others = [state_of(peek, s) for s in ("key", "team", "end_user") if s != scope]
    assert all(s.requests is s.tokens is s.max_parallel is None for s in others)
    committed = BudgetState(1000, 60, 50)  # the expired request's hold of 150 is released
    if scope == "end_user":  # its budget is a window budget
        assert peek.key.budget is peek.team.budget is None and peek.windows[2] == committed
    else:
        assert mine.budget == committed
    assert peek.windows == tuple(BudgetState(w.micros, 60, 50) for w in peeked.windows)

    too_many = await store.admit(replace(peeked, request_id="req-1", tokens=mine.tokens.remaining + 1))
    assert (too_many.admitted, too_many.reason, too_many.scope) == (False, "tpm", scope)
    assert (too_many.requests, too_many.tokens) == (mine.requests, mine.tokens)
    remaining = committed.remaining_micros
    too_dear = await store.admit(replace(peeked, request_id="req-2", cost_micros=remaining + 1))
    assert (too_dear.admitted, too_dear.reason) == (False, "budget")
    if scope == "end_user":
        assert (too_dear.window, too_dear.window_spent_micros, too_dear.window_limit_micros) == (2, 110, 1000)
    else:
        assert (too_dear.scope, too_dear.budget_spent_micros, too_dear.budget_limit_micros) == (scope, 110, 1000)
    exact = replace(peeked, request_id="req-3", tokens=mine.tokens.remaining, cost_micros=remaining)
    fits = await store.admit(exact)
    assert fits.admitted and fits.tokens.remaining == 0 and fits.requests.remaining == mine.requests.remaining - 1
    opened = [await store.admit(replace(peeked, request_id=f"req-lease-{i}")) for i in range(mine.free_leases)]
    assert [d.admitted for d in opened] == [True] * (mine.free_leases - 1) + [False]
    assert (opened[-1].reason, opened[-1].scope) == ("parallel", scope)


async def _everything(store) -> dict:
    """Every key of the store: its value and the instant it expires."""
    if isinstance(store, MemoryStore):
        now_ms, keys = store.clock_us() // 1000, store.keys
        return {n: (copy.deepcopy(keys._values[n]), keys._expires.get(n)) for n in keys.names(now_ms)}
    client = store.client
    return {n: (await client.dump(n), await client.pexpiretime(n)) async for n in client.scan_iter(count=100)}


@pytest.mark.parametrize("scope", ["key", "team", "end_user"])
async def test_a_peek_changes_nothing(store, clock, scope):
    """Not a bucket's refill, not an expired lease's release nor its budget holds', no reservation,
    lease, hold or marker: every key and its expiry are the same after a peek."""
    peeked = await peek_history(store, clock, scope)
    before = await _everything(store)
    assert len(before) >= 15
    assert state_of(await store.peek(peeked), scope).in_flight == 1  # the expired lease is still there...
    assert await _everything(store) == before
    await store.peek(replace(peeked, credential_id="cred-1"))  # a fence never written reads as absent
    assert await _everything(store) == before
    assert (await store.admit(replace(peeked, request_id="req-after"))).admitted  # ...until an admit releases it
    assert await _everything(store) != before


async def test_a_peek_of_a_fenced_credential_says_revoked(store, clock):
    await _set_raw(store, store.layout.fence("platform", "cred-1"), "0")
    peek = await store.peek(admission(key(rpm=10), team(), credential_id="cred-1"))
    assert peek.revoked and peek.key.requests is None
    assert not (await store.peek(admission(key(rpm=10), team(), credential_id="cred-2"))).revoked


# -- upstream quotas: the provider's, shared by every team ---------------------------------------


def quota(upstream: str, model: str = "", **limits) -> QuotaLimits:
    return QuotaLimits(upstream, model, **limits)


standalone = pytest.mark.parametrize("store", ["redis", "memory", "fakeredis"], indirect=True)


async def test_an_upstream_quota_cannot_share_a_cluster_slot_with_a_team(cluster_url, clock):
    """Why the config refuses upstream quotas on a Redis Cluster: their keys are every team's, so
    no team's slot holds them, and the one admit script cannot touch both."""
    store = RedisStore.from_url(cluster_url, timeout_ms=2000, clock_us=clock)
    try:
        with pytest.raises(StoreError):
            await store.admit(admission(key(), team(), quotas=((quota("openai", rpm=10),),)))
    finally:
        await store.close()


@standalone
async def test_the_first_candidate_with_room_is_taken_and_only_it_is_consumed(store, clock):
    """Two candidate targets: the first's quota first, then the second's, then a refusal by the
    quota that frees first; the key's and team's limits count every admitted request."""
    first, second = quota("openai", rpm=2, tpm=1_000), quota("azure", "gpt-4o", rpm=1)
    candidates = ((first,), (second,))
    k, t = key(rpm=100), team(rpm=100)
    taken = [await store.admit(admission(k, t, tokens=10, quotas=candidates)) for _ in range(3)]
    assert [(d.admitted, d.target) for d in taken] == [(True, 0), (True, 0), (True, 1)]
    assert [d.quota_left for d in taken] == [
        ((1, 990, UNLIMITED), (1, UNLIMITED, UNLIMITED)),
        ((0, 980, UNLIMITED), (1, UNLIMITED, UNLIMITED)),
        ((0, 980, UNLIMITED), (0, UNLIMITED, UNLIMITED)),
    ]
    refused = await store.admit(admission(k, t, tokens=10, quotas=candidates))
    assert (refused.admitted, refused.scope, refused.reason, refused.retry_after_ms, refused.target) == (
        False,
        "upstream",
        "rpm",
        30_000,  # the first refills one request in 30 s, the second in 60 s
        0,
    )
    assert refused.requests == BucketState(100, 97, 1_800)  # the headers stay the key's and team's
    clock.advance(30_000)
    assert (await store.admit(admission(k, t, tokens=10, quotas=candidates))).target == 0
    other_team = await store.admit(admission(key("x"), team("other"), quotas=candidates))
    assert (other_team.admitted, other_team.scope) == (False, "upstream")  # one quota for every team


@standalone
async def test_a_candidate_whose_every_scope_fits_is_taken(store, clock):
    """A target's scopes are its upstream account's and its deployment's: both must fit."""
    account = quota("openai", tpm=1_000)
    candidates = ((account, quota("openai", "gpt-4o", rpm=1)), (account, quota("openai", "gpt-4o-mini", rpm=5)))
    decisions = [await store.admit(admission(key(), team(), tokens=300, quotas=candidates)) for _ in range(4)]
    assert [(d.admitted, d.target) for d in decisions] == [(True, 0), (True, 1), (True, 1), (False, 1)]
    assert (decisions[3].scope, decisions[3].reason) == ("upstream", "tpm")  # the shared account is out


@standalone
async def test_a_request_no_candidate_can_ever_hold_is_refused_for_good(store, clock):
    small, big = ((quota("a", tpm=100),),), ((quota("a", tpm=100),), (quota("b", tpm=1_000),))
    never = await store.admit(admission(key(), team(), tokens=500, quotas=small))
    assert (never.admitted, never.scope, never.never_fits, never.target) == (False, "upstream", True, None)
    fits = await store.admit(admission(key(), team(), tokens=500, quotas=big))
    assert (fits.admitted, fits.target) == (True, 1)  # the first never could: the second is taken


@standalone
async def test_a_key_or_budget_refusal_comes_first_and_takes_no_quota(store, clock):
    candidates = ((quota("a", rpm=10),),)
    k = key(rpm=60, rpm_burst=1, budget_micros=100)
    assert (await store.admit(admission(k, team(), cost=10, quotas=candidates))).admitted
    by_key = await store.admit(admission(k, team(), cost=10, quotas=candidates))
    assert (by_key.scope, by_key.reason, by_key.quota_left) == ("key", "rpm", ((9, UNLIMITED, UNLIMITED),))
    by_budget = await store.admit(admission(key("b", budget_micros=5), team(), cost=10, quotas=candidates))
    assert (by_budget.scope, by_budget.reason, by_budget.quota_left) == ("key", "budget", ((9, UNLIMITED, UNLIMITED),))


@standalone
async def test_settlement_refunds_the_chosen_quota_and_frees_its_slot(store, clock):
    candidates = ((quota("a", tpm=1_000, max_parallel=1),), (quota("b", tpm=1_000, max_parallel=1),))
    first = admission(key(), team(), tokens=800, quotas=candidates)
    second = admission(key(), team(), tokens=800, quotas=candidates)
    assert (await store.admit(first)).target == 0
    assert (await store.admit(second)).target == 1
    refused = await store.admit(admission(key(), team(), tokens=300, quotas=candidates))
    assert (refused.scope, refused.reason, refused.retry_after_ms) == ("upstream", "tpm", 6_000)
    # the ticket settles only the candidate it took (the others' scopes left out)
    assert await store.settle(replace(settlement(first, 50, 50), quotas=(candidates[0], ())))
    again = await store.admit(admission(key(), team(), tokens=800, quotas=candidates))
    assert (again.admitted, again.target, again.quota_left[0]) == (True, 0, (UNLIMITED, 100, 0))
    # settling the second with every candidate named still refunds only the one it took
    assert await store.settle(replace(settlement(second, 50, 50), quotas=candidates))
    last = await store.admit(admission(key(), team(), tokens=100, quotas=candidates))
    assert (last.target, last.quota_left) == (1, ((UNLIMITED, 100, 0), (UNLIMITED, 800, 0)))


@standalone
async def test_an_abandoned_admission_releases_the_quota_the_store_chose(store, clock):
    """The caller never learnt which candidate its lost admit took: the reservation says."""
    candidates = ((quota("a", max_parallel=1),), (quota("b", max_parallel=1),))
    lost = admission(key(), team(), quotas=candidates)
    assert (await store.admit(lost)).target == 0
    assert (await store.admit(admission(key(), team(), quotas=candidates))).target == 1
    abandoned = Settlement(
        lost.request_id,
        lost.team,
        lost.key,
        "",
        "2023-11-15",
        Usage(),
        0,
        succeeded=False,
        abandoned=True,
        quotas=candidates,
    )
    assert await store.settle(abandoned)
    assert (await store.admit(admission(key(), team(), quotas=candidates))).target == 0


@standalone
async def test_a_long_request_keeps_its_quota_slot_while_renewed(store, clock):
    candidates = ((quota("a", max_parallel=1),),)
    a = admission(key(), team(), quotas=candidates)
    decision = await store.admit(a)
    clock.advance(800_000)
    assert await store.renew(Renewal(a.request_id, a.team, a.key, decision.day, 900_000, quotas=candidates))
    clock.advance(800_000)  # past the first lease, within the renewed one
    held = await store.admit(admission(key(), team(), quotas=candidates))
    assert (held.admitted, held.scope, held.reason) == (False, "upstream", "parallel")
    assert await store.settle(replace(settlement(a), quotas=candidates))
    assert (await store.admit(admission(key(), team(), quotas=candidates))).admitted


@pytest.mark.parametrize("store", ["redis", "memory"], indirect=True)
async def test_an_upstream_quota_is_exact_under_concurrent_admissions_of_many_teams(store, clock):
    """150 requests of 15 teams racing for two targets: exactly what their quotas hold is admitted,
    each target exactly its own quota."""
    candidates = ((quota("a", rpm=40),), (quota("b", "m", rpm=1, tpm=10**6), quota("b", rpm=25)))

    async def one(i: int) -> Decision:
        return await store.admit(admission(key(f"k{i}"), team(f"t{i % 15}"), tokens=10, quotas=candidates))

    decisions = await asyncio.gather(*(one(i) for i in range(150)))
    assert Counter(d.target for d in decisions if d.admitted) == {0: 40, 1: 1}
    assert all(d.scope == "upstream" for d in decisions if not d.admitted)


# -- fair shares of a contended upstream quota (teams.NAME.share) ---------------------------------

FAIR = ((quota("a", tpm=60_000),),)  # gives back one 100-token request every 100 ms


async def _ask(store, team_, tokens: int = 100):
    k, t, share = team_
    return await store.admit(admission(k, t, tokens=tokens, quotas=FAIR, share=share))


async def _saturate(store, clock, teams, steps: int) -> list[str]:
    """Every 100 ms, each team in turn asks until it is refused (a team with requests waiting);
    the names of the teams admitted, in order."""
    went = []
    for _ in range(steps):
        clock.advance(100)
        for team_ in teams:
            while (decision := await _ask(store, team_)).admitted:
                went.append(team_[1].name)
            assert (decision.scope, decision.reason) in (("upstream", "share"), ("upstream", "tpm"))
            if decision.reason == "share":  # room for it, left to the team behind: nothing taken
                assert decision.retry_after_ms == 100  # the quota's time to give back this request
                assert decision.quota_left == ((UNLIMITED, 100, UNLIMITED),)
    return went


async def _drain(store, teams) -> None:
    """Both teams take turns, uncontended, until the quota (60,000 tokens) is empty, each 1,000
    tokens per unit of its share at a time (so they end level); then each is refused by it once,
    so both wait for it."""
    for i in range(40):
        assert (await _ask(store, teams[i % 2], int(1_000 * teams[i % 2][2]))).admitted
    for team_ in teams:
        assert (await _ask(store, team_)).reason == "tpm"


@standalone
async def test_teams_that_wait_for_a_quota_take_it_in_proportion_to_their_shares(store, clock):
    """Each time the quota gives back one request, both teams ask (the one with share 1 first): the
    one behind its share goes, 1 in 3 for the first and 2 in 3 for the second. A team refused for
    its share takes nothing."""
    small, large = (key("s"), team("small"), 1.0), (key("l"), team("large"), 2.0)
    await _drain(store, (small, large))
    went = await _saturate(store, clock, (small, large), 30)
    assert len(went) == 30  # one request a step, and one team always takes it
    assert (went.count("small"), went.count("large")) == (10, 20)
    # without shares (a team's default share is 1), the first to ask would take every one
    went = await _saturate(store, clock, ((key("s"), team("small"), 1.0), (key("l"), team("large"), 1.0)), 30)
    assert (went.count("small"), went.count("large")) == (15, 15)


@standalone
async def test_a_quota_nobody_else_waits_for_goes_to_whoever_asks(store, clock):
    """The team behind its share stops asking: once its wait lapses (its refusal's retry and 200 ms
    after it), the other team takes every request the quota gives back, however far ahead it is."""
    small, large = (key("s"), team("small"), 1.0), (key("l"), team("large"), 2.0)
    await _drain(store, (small, large))
    turns = []
    for _ in range(10):
        clock.advance(100)
        turns.append((await _ask(store, small)).reason)
    # level after the drain, the small team goes once; then the large team is behind, and waits
    # until 100 ms (its retry) + 200 ms after its refusal
    assert turns == [None, "share", None, None, None, None, None, None, None, None]


@standalone
async def test_a_team_back_from_idle_gets_no_credit_for_its_idle_time(store, clock):
    """A team that used nothing while another used the quota alone starts level with it (credit for
    the other's last request only), not a minute behind: the two then alternate instead of the
    newcomer taking everything."""
    busy, back = (key("b"), team("busy"), 1.0), (key("n"), team("newcomer"), 1.0)
    for _ in range(60):
        assert (await _ask(store, busy, 1_000)).admitted
    for team_ in (busy, back):
        assert (await _ask(store, team_)).reason == "tpm"
    went = await _saturate(store, clock, (busy, back), 30)
    # the newcomer's credit is the busy team's last request (1,000 tokens): 10 of its own first
    assert went[:10] == ["newcomer"] * 10
    assert (went[10:].count("busy"), went[10:].count("newcomer")) == (10, 10)


@standalone
async def test_a_team_waits_only_for_the_quota_scope_that_refused_it(store, clock):
    """A's target uses an account quota (with room) and a deployment's (its one slot held by A's own
    long request); B uses the account only. A's refusals are the deployment's: B is never held back
    on the account for A's share."""
    account, deployment = quota("u", tpm=600_000), quota("u", "m", max_parallel=1)
    a, b = (key("a"), team("A"), 1.0), (key("b"), team("B"), 1.0)
    a_quotas, b_quotas = ((account, deployment),), ((account,),)
    assert (await store.admit(admission(a[0], a[1], tokens=100, quotas=a_quotas))).admitted
    reasons = []
    for _ in range(10):
        clock.advance(1000)
        refused = await store.admit(admission(a[0], a[1], tokens=100, quotas=a_quotas))
        assert (refused.scope, refused.reason) == ("upstream", "parallel")
        reasons.append((await store.admit(admission(b[0], b[1], tokens=100, quotas=b_quotas))).reason)
    assert reasons == [None] * 10


@standalone
async def test_a_candidate_a_request_can_never_fit_is_not_waited_for(store, clock):
    """A's 60k-token request can never fit the first target (tpm 1k) and waits for the second: B,
    on the first target only, is never held back there for A's share."""
    small, large = quota("one", tpm=1_000), quota("two", tpm=60_000)
    a_quotas, b_quotas = ((small,), (large,)), ((small,),)
    assert (await store.admit(admission(key("a"), team("A"), tokens=60_000, quotas=a_quotas))).target == 1
    reasons = []
    for _ in range(10):
        clock.advance(1000)
        assert not (await store.admit(admission(key("a"), team("A"), tokens=60_000, quotas=a_quotas))).admitted
        reasons.append((await store.admit(admission(key("b"), team("B"), tokens=100, quotas=b_quotas))).reason)
    assert reasons == [None] * 10


@standalone
async def test_large_shares_keep_their_ratio(store, clock):
    """Shares 1500:3000 split a requests-only quota 1:2 like 1:2 does: a step of 1/3000 of a request
    is kept in full, not rounded away."""
    rpm_quota = ((quota("r", rpm=600),),)  # one request back every 100 ms
    small, large = (key("s"), team("S"), 1500.0), (key("l"), team("L"), 3000.0)
    for i in range(600):
        k, t, share = (small, large)[i % 2]
        assert (await store.admit(admission(k, t, quotas=rpm_quota, share=share))).admitted
    went = []
    for _ in range(60):
        clock.advance(100)
        for k, t, share in (small, large):
            while (await store.admit(admission(k, t, quotas=rpm_quota, share=share))).admitted:
                went.append(t.name)
    assert abs(went.count("S") - 20) <= 1 and abs(went.count("L") - 40) <= 1, (went.count("S"), went.count("L"))


@standalone
async def test_a_team_that_gives_up_stops_holding_the_quota_within_about_a_second(store, clock):
    """X asks once for more than the quota has (retry in 49 s) and never again: Y, alone again, is
    held back for X's share for at most about a second, not for X's whole retry."""
    q = ((quota("q", tpm=60_000),),)
    for _ in range(50):
        assert (await store.admit(admission(key("y"), team("Y"), tokens=1_000, quotas=q))).admitted
    refused = await store.admit(admission(key("x"), team("X"), tokens=59_000, quotas=q))
    assert (refused.reason, refused.retry_after_ms) == ("tpm", 49_000)
    reasons = []
    for _ in range(5):
        clock.advance(500)
        reasons.append((await store.admit(admission(key("y"), team("Y"), tokens=1_000, quotas=q))).reason)
    assert reasons[2:] == [None, None, None], reasons  # from 1.5 s on (the 1 s cap and 200 ms margin)


# -- provider holds shared by the replicas (hold.lua, held.lua) ------------------------------------


async def test_a_hold_ends_by_the_store_clock_and_the_later_end_is_kept(store, clock):
    now_ms = clock() // 1000
    assert await store.hold("mock", "gpt-4o", "requests", 5_000) == now_ms + 5_000
    clock.advance(1_000)
    # shorter than what is stored: the stored end stays, with its kind
    assert await store.hold("mock", "gpt-4o", "tokens", 2_000) == now_ms + 5_000
    assert await store.hold("backup", "gpt-4o", "tokens", 9_000) == now_ms + 10_000
    shared = await store.holds()
    assert shared.now_ms == now_ms + 1_000
    assert sorted(shared.holds, key=lambda h: h.upstream) == [
        TargetHold("backup", "gpt-4o", "tokens", now_ms + 10_000),
        TargetHold("mock", "gpt-4o", "requests", now_ms + 5_000),
    ]
    clock.advance(1_000)
    # longer: it replaces the stored end, and its kind
    assert await store.hold("mock", "gpt-4o", "tokens", 7_000) == now_ms + 9_000
    assert TargetHold("mock", "gpt-4o", "tokens", now_ms + 9_000) in (await store.holds()).holds


async def test_a_hold_that_ended_is_not_read_and_is_dropped_by_the_next_write(store, clock):
    now_ms = clock() // 1000
    await store.hold("mock", "gpt-4o", "requests", 1_000)
    await store.hold("mock", "o3", "requests", 3_000)
    clock.advance(1_000)  # the first ends exactly now
    assert [h.model for h in (await store.holds()).holds] == ["o3"]
    await store.hold("backup", "o3", "requests", 500)
    ttls = await _ttls(store)
    assert list(ttls) == ["llmrl:{holds}"]
    # the hash outlives its latest end (o3's, 2 s from now) by TTL_MARGIN_MS, and no more
    assert 2_000 < ttls["llmrl:{holds}"] <= 3_000
    fields = (
        store.keys.hash("llmrl:{holds}", clock() // 1000)
        if isinstance(store, MemoryStore)
        else await store.client.hgetall("llmrl:{holds}")
    )
    assert sorted(f if isinstance(f, str) else f.decode() for f in fields) == ["backup\to3", "mock\to3"]
    assert (await store.holds()).now_ms == now_ms + 1_000


async def test_no_holds_reads_as_the_store_now_and_nothing(store, clock):
    shared = await store.holds()
    assert (shared.now_ms, shared.holds) == (clock() // 1000, ())


@pytest.mark.parametrize("scheme", ["redis", "cluster"])
async def test_holds_on_the_stores_own_clock(request, scheme):
    """Unpinned: the scripts take Redis' TIME, which is this machine's clock here."""
    url = request.getfixturevalue("redis_url" if scheme == "redis" else "cluster_url")
    store = RedisStore.from_url(url, timeout_ms=STORE_TIMEOUT_MS)
    try:
        before_ms = time.time_ns() // 1_000_000
        ends = await store.hold("mock", "gpt-4o", "requests", 60_000)
        shared = await store.holds()
        after_ms = time.time_ns() // 1_000_000
        assert before_ms + 60_000 <= ends <= after_ms + 60_000
        assert before_ms <= shared.now_ms <= after_ms
        assert shared.holds == (TargetHold("mock", "gpt-4o", "requests", ends),)
    finally:
        await store.close()


@real_and_memory
async def test_concurrent_holds_keep_the_latest_end(store, clock):
    now_ms = clock() // 1000
    lengths = list(range(1, 2 * CLUSTER_MAX_CONNECTIONS + 51))
    random.Random(16).shuffle(lengths)
    await asyncio.gather(*(store.hold("mock", "gpt-4o", "requests", ms * 100) for ms in lengths))
    assert (await store.holds()).holds == (TargetHold("mock", "gpt-4o", "requests", now_ms + max(lengths) * 100),)


@pytest.mark.parametrize("store", ["cluster"], indirect=True)
async def test_the_holds_hash_lives_in_a_slot_of_its_own(store, clock):
    await store.hold("mock", "gpt-4o", "requests", 5_000)
    assert await store.client.cluster_keyslot("llmrl:{holds}") == key_slot(b"{holds}")
    assert list(await _ttls(store)) == ["llmrl:{holds}"]
