"""Stopping background tasks: cancelled, then awaited for a bounded time, never forever.

A poller whose cancellation is swallowed somewhere below it (a driver that turns a cancelled read
into its own error, which the poller then catches as a store failure and goes on) would otherwise
keep `await task` waiting for ever, and with it the app's shutdown: a uvicorn worker that never
exits. The pollers also check a stop flag on each turn, so such a task still ends by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("proxy.background")

STOP_WITHIN_S = 2.0


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], what: str, within_s: float = STOP_WITHIN_S) -> None:
    """Cancel `tasks` and wait up to `within_s` for them to end; one still running is left behind
    (logged), so a shutdown always goes on."""
    running = [task for task in tasks if not task.done()]
    for task in running:
        task.cancel()
    if not running:
        return
    done, pending = await asyncio.wait(running, timeout=within_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended with an error while stopping", what, exc_info=task.exception())
    if pending:
        log.error(
            "%d %s task(s) did not stop within %g s of being cancelled; shutdown goes on", len(pending), what, within_s
        )
