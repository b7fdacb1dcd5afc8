"""Background pollers stop at shutdown even when a driver swallows their cancellation.

A store driver that turns a cancelled read into its own error (which the poller takes for a store
failure and goes on) must not keep the app's shutdown waiting for ever: such a uvicorn worker was
once left running, orphaned, after its supervisor was killed. The pollers end on their own stop
flag, and `stop_tasks` never waits on a task for longer than its bound.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.background import stop_tasks
from proxy.registry.cache import RegistryCache
from proxy.registry.errors import StoreFailed
from proxy.registry.store import MemoryRegistryBackend


class SwallowingBackend(MemoryRegistryBackend):
    """Its version read turns a cancellation into a store failure, as a careless driver might."""

    async def version(self) -> int:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise StoreFailed("the store did not answer (cancelled)") from None
        return await super().version()


async def test_a_registry_poll_whose_cancellation_is_swallowed_still_stops() -> None:
    cache = RegistryCache(SwallowingBackend(), poll_interval_s=0.01)
    cache.start()
    await asyncio.sleep(0.1)
    task = cache._task
    started = time.monotonic()
    await cache.stop()
    assert time.monotonic() - started < 1.0  # ended by its stop flag, well before stop_tasks' bound
    assert task is not None
    await asyncio.sleep(0.1)
    assert task.done()


async def test_stop_tasks_never_waits_on_a_task_that_will_not_end(caplog) -> None:
    done = asyncio.Event()

    async def stubborn() -> None:
        while not done.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="proxy.background"):
        await stop_tasks([task], "stubborn", within_s=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert caplog.messages == ["1 stubborn task(s) did not stop within 0.2 s of being cancelled; shutdown goes on"]
    done.set()  # let it end, for the test's own loop to close
    await task
