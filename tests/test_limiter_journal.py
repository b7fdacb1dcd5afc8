"""The spend journal: bounded, idempotent flushes, exactly the flushed entry removed, and the
abandons of admits whose reply was lost."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import StoreError, StoreUnreachable
from proxy.limits import journal as journal_module
from proxy.limits.admission import Refusal, Ticket
from proxy.limits.limiter import Limiter
from proxy.limits.memory_store import MemoryStore
from proxy.limits.types import ScopeLimits, Settled, Settlement, Usage
from proxy.request.authenticate import KeyRing
from tests.support.configs import KEYS, make_config


def settlement(n: int) -> Settlement:
    return Settlement(
        f"req-{n}",
        ScopeLimits("team", "platform"),
        ScopeLimits("key", "alice"),
        "chat-model",
        "2026-01-01",
        Usage(1, 1),
        n,
    )


class SlowStore:
    """Settles after a pause, during which the test appends to the journal."""

    clock_us = None
    retention_days = 35

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
    monkeypatch.setattr(journal_module, "JOURNAL_CAPACITY", 3)
    store = SlowStore()
    limiter = Limiter(make_config("http://127.0.0.1:9/v1"), store)
    for n in range(3):
        limiter.journal.add(settlement(n))
    store.during = lambda: limiter.journal.add(settlement(3))  # full: req-0 (being flushed) drops out
    flushed = await limiter.journal.flush()
    assert store.settled == ["req-0", "req-1", "req-2", "req-3"]
    assert flushed == 4 and not limiter.journal.entries
    assert limiter.journal.dropped == 1


async def test_a_failed_flush_keeps_everything_in_order():
    store = SlowStore()
    limiter = Limiter(make_config("http://127.0.0.1:9/v1"), store)
    for n in range(3):
        limiter.journal.add(settlement(n))
    store.down = True
    assert await limiter.journal.flush() == 0
    assert [s.request_id for s in limiter.journal.entries] == ["req-0", "req-1", "req-2"]
    store.down = False
    assert await limiter.journal.flush() == 3 and store.settled == ["req-0", "req-1", "req-2"]


# -- abandons: an admit whose reply was lost, for a request that went nowhere ------------------------


class LostReplies:
    """A store whose admits fail: `error` says whether they were sent (StoreError) or not."""

    clock_us = None
    retention_days = 35

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
    assert all(s.abandoned and s.usage == Usage() and s.cost_micros == 0 for s in limiter.journal.entries)
    return [s.request_id for s in limiter.journal.entries]


async def test_deny_abandons_an_admit_that_may_have_run():
    limiter, caller = limiter_for(LostReplies(StoreError("no reply within 0.3s")), "deny")
    assert await limiter.admit("lost", caller.scopes, 10, 10) == Refusal(caller.scopes, None)
    assert abandoned(limiter) == ["lost"]
    limiter.admitter.store = LostReplies(StoreUnreachable("not sent: backing off"))
    assert await limiter.admit("never-sent", caller.scopes, 10, 10) == Refusal(caller.scopes, None)
    assert abandoned(limiter) == ["lost"], "an admit that was never sent needs no release"


async def test_allow_abandons_only_what_the_fallback_refused():
    limiter, caller = limiter_for(LostReplies(StoreError("no reply")), "allow", {"max_parallel": 1})
    ticket = await limiter.admit("served", caller.scopes, 10, 10)
    assert isinstance(ticket, Ticket) and ticket.degraded
    assert abandoned(limiter) == []  # its own settlement will reach Redis
    refusal = await limiter.admit("refused", caller.scopes, 10, 10)
    assert isinstance(refusal, Refusal) and refusal.decision is not None and refusal.decision.reason == "parallel"
    assert abandoned(limiter) == ["refused"]


async def test_a_cancelled_admit_is_abandoned():
    limiter, caller = limiter_for(LostReplies(StoreError("unused"), hang=True), "deny")
    admitting = asyncio.ensure_future(limiter.admit("cancelled", caller.scopes, 10, 10))
    await asyncio.sleep(0.01)
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert abandoned(limiter) == ["cancelled"]
