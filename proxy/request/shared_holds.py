"""Provider holds shared by every replica through the store, on the store's clock.

A replica that makes or lengthens a hold (`ProviderHolds.follow`) writes it to the store off the
request path, in a task of its own (`hold.lua`: until the store's now + the hold, or the end
already stored if later). Every replica reads them all every `POLL_INTERVAL_S` (`held.lua`: the
store's now and each hold's end, one call) and holds each target for `end - now` by its own
monotonic clock, never shortening a hold it has and never longer than its own `max_hold_s` for
that upstream (0 or an upstream it does not know: ignored). So a hold reaches every replica within
one poll, and the store's clock, not a replica's, says when it ends.

When the store does not answer, each replica keeps its own holds, as without sharing: no request
waits for or fails on this. A failure is logged once (and the recovery once), and every failed call
is counted in `llm_proxy_store_errors_total` (op `hold` for a write, `holds` for a poll).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from ..background import stop_tasks
from ..errors import StoreError
from ..limits.types import HoldKind, Store
from .holds import ProviderHolds, TargetKey

POLL_INTERVAL_S = 0.25

log = logging.getLogger("proxy.holds")


class HoldSharing:
    def __init__(
        self,
        store: Store,
        holds: ProviderHolds,
        max_hold_s: Callable[[str], float],
        *,
        on_store_error: Callable[[str], None] | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.store = store
        self.holds = holds
        self.max_hold_s = max_hold_s  # an upstream's cap now (a reload may change it); 0: not followed
        self.on_store_error = on_store_error
        self.poll_interval_s = poll_interval_s
        self._writes: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._poll: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing = False
        holds.on_hold = self.publish

    def publish(self, key: TargetKey, seconds: float, kind: HoldKind) -> None:
        """Write a new or longer hold to the store, without waiting for it."""
        task = asyncio.get_running_loop().create_task(self._write(key, seconds, kind))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: TargetKey, seconds: float, kind: HoldKind) -> None:
        upstream, model = key
        try:
            await self.store.hold(upstream, model, kind, max(1, math.ceil(seconds * 1000)))
        except Exception as exc:  # a task nobody awaits: nothing may escape it
            self._failed("hold", exc)
        else:
            self._answered()

    async def refresh(self) -> None:
        """Hold every target another replica holds, for what is left of it by the store's clock."""
        shared = await self.store.holds()
        for hold in shared.holds:
            cap = self.max_hold_s(hold.upstream)
            if cap > 0:
                left_s = (hold.end_ms - shared.now_ms) / 1000
                self.holds.adopt((hold.upstream, hold.model), min(left_s, cap), hold.kind)

    def start(self) -> None:
        if self._poll is None:
            self._stopping = False
            self._poll = asyncio.get_running_loop().create_task(self._polling(), name="provider-holds")

    async def stop(self) -> None:
        self._stopping = True
        await stop_tasks([*self._writes, *([self._poll] if self._poll is not None else [])], "provider holds")
        self._poll = None

    async def _polling(self) -> None:
        while not self._stopping:  # also ends a poll whose cancellation a driver swallowed
            try:
                await self.refresh()
            except Exception as exc:  # the poll goes on whatever one read did
                self._failed("holds", exc)
            else:
                self._answered()
            await asyncio.sleep(self.poll_interval_s)

    def _failed(self, op: str, exc: Exception) -> None:
        """Counted each time; logged once until the store answers again (a driver surprise, with
        its traceback)."""
        if self.on_store_error is not None:
            self.on_store_error(op)
        if self._failing:
            return
        self._failing = True
        if isinstance(exc, StoreError):
            log.warning("provider holds not shared (%s); each replica keeps its own meanwhile", exc)
        else:
            log.error("unexpected error sharing provider holds (%s); each replica keeps its own", op, exc_info=exc)

    def _answered(self) -> None:
        if self._failing:
            log.info("provider holds shared again")
        self._failing = False
