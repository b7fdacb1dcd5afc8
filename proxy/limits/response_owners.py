"""Who created a stored response: response id -> (team, upstream, target model), for a while.

A `GET /v1/responses/{id}` (and DELETE, cancel, input_items, `previous_response_id`) goes to the
upstream and target that created the response, and only for keys of the team that created it.
One write per created response, after the response; one read per call that names a response id
(chat never touches this). Kept `response_retention_days` (default 30) in Redis, or in this
process with the in-process store.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..errors import StoreError
from .layout import DEFAULT_PREFIX

MEMORY_CAPACITY = 100_000  # the in-process store forgets the oldest beyond this


@dataclass(frozen=True, slots=True)
class Owner:
    team: str
    model: str  # the proxy's model name the response was created with
    upstream: str
    target_model: str

    def encode(self) -> bytes:
        return orjson.dumps([self.team, self.model, self.upstream, self.target_model])

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Owner | None:
        if raw is None:
            return None
        try:
            team, model, upstream, target = orjson.loads(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        return cls(str(team), str(model), str(upstream), str(target))


class ResponseOwners(Protocol):
    async def remember(self, response_id: str, owner: Owner) -> None: ...

    async def owner(self, response_id: str) -> Owner | None: ...


class MemoryOwners:
    """This process's memory: the in-process store's companion (one replica, by definition)."""

    def __init__(self, ttl_s: float, capacity: int = MEMORY_CAPACITY) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._owners: OrderedDict[str, tuple[float, Owner]] = OrderedDict()

    async def remember(self, response_id: str, owner: Owner) -> None:
        self._owners[response_id] = (time.monotonic() + self.ttl_s, owner)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    async def owner(self, response_id: str) -> Owner | None:
        found = self._owners.get(response_id)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]


class RedisOwners:
    """One string key per response, with its TTL, on the store's own client (its short timeouts)."""

    def __init__(self, client: Any, ttl_s: int, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix

    def key(self, response_id: str) -> str:
        return f"{self.prefix}:response:{response_id}"

    async def remember(self, response_id: str, owner: Owner) -> None:
        try:
            await self.client.set(self.key(response_id), owner.encode(), ex=self.ttl_s)
        except Exception as exc:  # the driver's errors, wrapped once here
            raise StoreError(f"remembering a response failed: {exc!r}") from exc

    async def owner(self, response_id: str) -> Owner | None:
        try:
            raw = await self.client.get(self.key(response_id))
        except Exception as exc:
            raise StoreError(f"reading a response's owner failed: {exc!r}") from exc
        return Owner.decode(raw)


def owners_for(store: object, retention_days: int) -> ResponseOwners:
    """Beside the Redis store, in Redis; beside the in-process store, in this process."""
    from .redis_store import RedisStore

    ttl_s = retention_days * 86_400
    if isinstance(store, RedisStore):
        return RedisOwners(store.client, ttl_s, store.layout.prefix)
    return MemoryOwners(ttl_s)
