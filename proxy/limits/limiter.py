"""Admit and settle one request against its key's and its team's limits and budgets.

The store (Redis, or this process) holds the truth. `Limiter` wires the parts, each a module:
admission and the allow-mode fallback (`admission.py`), settlement (`settlement.py`), lease
renewal for long requests (`renewal.py`), the spend journal for settlements that could not reach
the store (`journal.py`), the store's health (`health.py`) and the budget day (`days.py`). It
answers with a `Ticket` or a `Refusal`; what a refusal means to a client is the request path's
business (`proxy.request.admit`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..background import stop_tasks
from ..config import Config
from .admission import Admitter, QuotaWatcher, Refusal, Ticket
from .days import BudgetCalendar
from .health import StoreHealth
from .journal import FLUSH_INTERVAL_S, Journal
from .memory_store import MemoryStore
from .quotas import NO_QUOTAS, QuotaCandidates
from .renewal import Renewer
from .scopes import Scopes
from .seen import Mark
from .settlement import Settler
from .types import Settled, Store, Usage

log = logging.getLogger("proxy.limits")


class Limiter:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        fallback: MemoryStore | None = None,
        calendar: BudgetCalendar | None = None,
        on_store_error: Callable[[str], None] | None = None,
        on_quota: QuotaWatcher | None = None,
    ) -> None:
        self.store = store
        self.fallback = fallback
        self.calendar = calendar or BudgetCalendar(lambda: config.budget_timezone, store.clock_us)
        lease_ttl_ms = config.store.lease_ttl_s * 1000
        self.health = StoreHealth(config.store.on_redis_error, on_store_error)
        self.journal = Journal(store, self.health)
        self.admitter = Admitter(
            store,
            fallback,
            allow_on_outage=config.store.on_redis_error == "allow",
            replicas=config.store.replicas,
            lease_ttl_ms=lease_ttl_ms,
            calendar=self.calendar,
            journal=self.journal,
            health=self.health,
            on_quota=on_quota,
        )
        self.settler = Settler(store, self.journal, self.health)
        self.renewer = Renewer(lease_ttl_ms, self.health)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def unsettled(self) -> int:
        return self.settler.unsettled

    @property
    def seen_committed(self) -> dict[Mark, int]:
        return self.admitter.seen.committed

    async def admit(
        self,
        request_id: str,
        scopes: Scopes,
        tokens: int,
        cost_micros: int,
        end_user: str | None = None,
        quotas: QuotaCandidates = NO_QUOTAS,
    ) -> Ticket | Refusal:
        admitted = await self.admitter.admit(request_id, scopes, tokens, cost_micros, end_user, quotas)
        if isinstance(admitted, Ticket):
            self.settler.opened()
            self.renewer.follow(admitted)
        return admitted

    async def settle(
        self,
        ticket: Ticket,
        model: str,
        usage: Usage,
        cost_micros: int,
        tags: tuple[tuple[str, str], ...] = (),
        succeeded: bool = True,
    ) -> Settled | None:
        self.renewer.forget(ticket)
        return await self.settler.settle(ticket, model, usage, cost_micros, tags, succeeded)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            background: list[Coroutine[Any, Any, None]] = [self.journal.flush_forever(), self.renewer.renew_forever()]
            self._tasks = [loop.create_task(job) for job in background]

    async def close(self, flush_for_s: float = 10.0) -> None:
        """Wait for admitted requests to settle, stop the background tasks, then keep flushing the
        journal for up to `flush_for_s`."""
        deadline = time.monotonic() + flush_for_s
        if not await self.settler.all_settled(flush_for_s):
            log.error("%d admitted requests were still unsettled at shutdown", self.settler.unsettled)
        await stop_tasks(self._tasks, "limiter background")
        self._tasks = []
        while True:
            await self.journal.flush()
            if not self.journal.entries or time.monotonic() >= deadline:
                break
            await asyncio.sleep(FLUSH_INTERVAL_S / 4)
        if self.journal.entries:
            log.error("%d settlements could not be flushed at shutdown: their spend is lost", len(self.journal))


def reserved_tokens(prompt_tokens: int, max_output: int) -> int:
    return max(1, math.ceil(prompt_tokens + max_output))
