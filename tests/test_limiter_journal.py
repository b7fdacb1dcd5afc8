"""The spend journal: bounded, idempotent flushes, and exactly the flushed entry removed."""

from __future__ import annotations

import asyncio

from proxy.limits import limiter as limiter_module
from proxy.limits.limiter import Limiter
from proxy.limits.types import ScopeLimits, Settled, Settlement, StoreError, Usage
from tests.support.configs import make_config


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
