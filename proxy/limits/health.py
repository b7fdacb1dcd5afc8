"""Whether the rate-limit store answers: one log line when an outage starts and one when it ends,
and a count of every failed call (`llm_proxy_store_errors_total{op}`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import StoreError

log = logging.getLogger("proxy.limits")


class StoreHealth:
    def __init__(self, on_redis_error: str, on_error: Callable[[str], None] | None = None) -> None:
        self.on_redis_error = on_redis_error  # logged with the outage: what the proxy does meanwhile
        self.on_error = on_error  # the metrics hook, called with the failed operation
        self._outage_since: float | None = None
        self.outages = 0  # how many outages have begun: tells one outage from the next

    def failed(self, op: str, exc: BaseException, *, outage: bool = True) -> None:
        """A store call failed; anything but a StoreError is a driver surprise, logged with its traceback."""
        if not isinstance(exc, StoreError):
            log.error("unexpected error from the rate-limit store on %s", op, exc_info=exc)
        if self.on_error is not None:
            self.on_error(op)
        if outage and self._outage_since is None:
            self._outage_since = time.monotonic()
            self.outages += 1
            log.error("rate-limit store unavailable (%s); on_redis_error=%s", type(exc).__name__, self.on_redis_error)

    def answered(self) -> None:
        if self._outage_since is not None:
            log.warning("rate-limit store recovered after %.1fs", time.monotonic() - self._outage_since)
            self._outage_since = None
