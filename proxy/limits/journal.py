"""The spend journal: settlements that could not reach the store wait here, bounded, and are
flushed in order when it answers again (settle is idempotent per request id, so a retried
flush never counts twice)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .health import StoreHealth
from .types import Settlement, Store

log = logging.getLogger("proxy.limits")

JOURNAL_CAPACITY = 100_000
FLUSH_INTERVAL_S = 1.0


class Journal:
    def __init__(self, store: Store, health: StoreHealth, capacity: int | None = None) -> None:
        self.store = store
        self.health = health
        self.entries: deque[Settlement] = deque(maxlen=capacity or JOURNAL_CAPACITY)
        self.dropped = 0  # the oldest entries a full journal let go

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, settlement: Settlement) -> None:
        if len(self.entries) == self.entries.maxlen:
            self.dropped += 1
            log.error("spend journal full (%d entries): oldest settlement dropped", self.entries.maxlen)
        self.entries.append(settlement)

    async def flush(self) -> int:
        """Push journaled settlements to the store; returns how many were flushed."""
        flushed = 0
        entries = self.entries
        while entries:
            settlement = entries[0]
            try:
                await self.store.settle(settlement)
            except Exception as exc:
                self.health.failed("flush", exc, outage=False)
                return flushed
            # settlements may have joined (and a full journal dropped its oldest) meanwhile:
            # remove exactly the one that was flushed
            if entries and entries[0] is settlement:
                entries.popleft()
            else:
                try:
                    entries.remove(settlement)
                except ValueError:
                    pass
            flushed += 1
        if flushed:
            log.warning("spend journal flushed: %d settlements", flushed)
        return flushed

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self.entries:
                await self.flush()
