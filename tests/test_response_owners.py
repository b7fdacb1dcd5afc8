"""Response id -> creator, in Redis (with its TTL) and in this process, and through the proxy on Redis."""

from __future__ import annotations

import asyncio

import openai
import redis

from proxy.limits.redis_store import RedisStore
from proxy.limits.response_owners import MemoryOwners, Owner, owners_for
from tests.support.configs import KEYS, make_config

OWNER = Owner("platform", "chat-model", "mock", "gpt-4o-mini")


def test_memory_owners_remember_forget_and_stay_bounded():
    async def run() -> None:
        owners = MemoryOwners(ttl_s=60, capacity=2)
        for name in ("a", "b", "c"):
            await owners.remember(name, OWNER)
        assert [await owners.owner(n) for n in ("a", "b", "c")] == [None, OWNER, OWNER]
        expired = MemoryOwners(ttl_s=-1)
        await expired.remember("a", OWNER)
        assert await expired.owner("a") is None

    asyncio.run(run())


def test_redis_owners_keep_the_configured_time(redis_url):
    async def run() -> None:
        store = RedisStore.from_url(redis_url)
        try:
            owners = owners_for(store, retention_days=30)
            await owners.remember("resp_1", OWNER)
            assert await owners.owner("resp_1") == OWNER
            assert await owners.owner("resp_2") is None
        finally:
            await store.close()

    asyncio.run(run())
    ttl = redis.Redis.from_url(redis_url).ttl("llmrl:response:resp_1")
    assert 30 * 86_400 - 60 < ttl <= 30 * 86_400


def test_a_response_created_through_one_replica_is_read_through_another(mock_upstream, start_proxy, redis_url):
    config = make_config(mock_upstream.url, redis_url=redis_url)
    first, _ = start_proxy(config)
    second, _ = start_proxy(config)
    with openai.OpenAI(base_url=first.base_url, api_key=KEYS["alice"], max_retries=0) as sdk:
        created = sdk.responses.create(model="chat-model", input="hello")
    with openai.OpenAI(base_url=second.base_url, api_key=KEYS["alice"], max_retries=0) as sdk:
        assert sdk.responses.retrieve(created.id).id == created.id
