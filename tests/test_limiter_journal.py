"""The spend journal: bounded, idempotent flushes, exactly the flushed entry removed, and the
abandons of admits whose reply was lost."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import RateLimited, StoreUnavailable
from proxy.limits import limiter as limiter_module
from proxy.limits.limiter import Limiter
from proxy.limits.memory_store import MemoryStore
from proxy.limits.types import (
    ScopeLimits,
    Settled,
    Settlement,
    StoreError,
    StoreUnreachable,
    Usage,
)
from proxy.request.authenticate import KeyRing
from tests.support.configs import KEYS, make_config


def settlement(n: int) -> Settlement:
    return Settlement(f"req-{n}", ScopeLimits("team", "platform"), ScopeLimits("key", "alice"), "chat-model",
                      "2026-01-01", Usage(1, 1), n)


class SlowStore:
    """Settles after a pause, during which the test appends to the journal."""

    def __init__(self, during=None):
        self.settled: list[str] = []
        self.during = during
        self.down = False

    async def settle(self, s: Settlement) -> Settled:
        if self.down:
            raise StoreError("down")
        await asyncio.sleep(0)
        if self.during:
            self.during()
            self.during = None
        self.settled.append(s.request_id)
        return Settled(True)


async def test_a_full_journal_rotating_during_a_flush_loses_only_the_oldest(monkeypatch):
    monkeypatch.setattr(limiter_module, "JOURNAL_CAPACITY", 3)
    store = SlowStore()
    limiter = Limiter(make_config("http://127.0.0.1:9/v1"), store)
    for n in range(3):
        limiter._journal(settlement(n))
    store.during = lambda: limiter._journal(settlement(3))  # full: req-0 (being flushed) drops out
    flushed = await limiter.flush_journal()
    assert store.settled == ["req-0", "req-1", "req-2", "req-3"]
    assert flushed == 4 and not limiter.journal
    assert limiter.journal_dropped == 1


async def test_a_failed_flush_keeps_everything_in_order():
    store = SlowStore()
    limiter = Limiter(make_config("http://127.0.0.1:9/v1"), store)
    for n in range(3):
        limiter._journal(settlement(n))
    store.down = True
    assert await limiter.flush_journal() == 0
    assert [s.request_id for s in limiter.journal] == ["req-0", "req-1", "req-2"]
    store.down = False
    assert await limiter.flush_journal() == 3 and store.settled == ["req-0", "req-1", "req-2"]


# -- abandons: an admit whose reply was lost, for a request that went nowhere ------------------------

class LostReplies:
    """A store whose admits fail: `error` says whether they were sent (StoreError) or not."""

    def __init__(self, error: StoreError, hang: bool = False) -> None:
        self.error = error
        self.hang = hang

    async def admit(self, admission):
        if self.hang:
            await asyncio.Event().wait()
        raise self.error


def limiter_for(store, mode: str, limits: dict | None = None) -> tuple[Limiter, object]:
    def patch(data):
        data["store"] = {"redis_url": "redis://127.0.0.1:9/0", "on_redis_error": mode}
        data["keys"]["alice"]["limits"] = limits or {}
    config = make_config("http://127.0.0.1:9/v1", patch=patch)
    caller = KeyRing(config).authenticate(KEYS["alice"])
    return Limiter(config, store, fallback=MemoryStore()), caller


def abandoned(limiter: Limiter) -> list[str]:
    assert all(s.abandoned and s.usage == Usage() and s.cost_micros == 0 for s in limiter.journal)
    return [s.request_id for s in limiter.journal]


async def test_deny_abandons_an_admit_that_may_have_run():
    limiter, caller = limiter_for(LostReplies(StoreError("no reply within 0.3s")), "deny")
    with pytest.raises(StoreUnavailable):
        await limiter.admit("lost", caller, 10, 10)
    assert abandoned(limiter) == ["lost"]
    limiter.store = LostReplies(StoreUnreachable("not sent: backing off"))
    with pytest.raises(StoreUnavailable):
        await limiter.admit("never-sent", caller, 10, 10)
    assert abandoned(limiter) == ["lost"], "an admit that was never sent needs no release"


async def test_allow_abandons_only_what_the_fallback_refused():
    limiter, caller = limiter_for(LostReplies(StoreError("no reply")), "allow", {"max_parallel": 1})
    ticket = await limiter.admit("served", caller, 10, 10)
    assert ticket.degraded and abandoned(limiter) == []  # its own settlement will reach Redis
    with pytest.raises(RateLimited):
        await limiter.admit("refused", caller, 10, 10)
    assert abandoned(limiter) == ["refused"]


async def test_a_cancelled_admit_is_abandoned():
    limiter, caller = limiter_for(LostReplies(StoreError("unused"), hang=True), "deny")
    admitting = asyncio.ensure_future(limiter.admit("cancelled", caller, 10, 10))
    await asyncio.sleep(0.01)
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert abandoned(limiter) == ["cancelled"]
