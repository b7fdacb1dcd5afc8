"""Lease renewal: a request longer than the lease TTL keeps its parallel slots and budget holds.

Admitted requests that run longer than a third of `store.lease_ttl_s` have their leases renewed
in the store that admitted them, by one background task, until they settle: `max_parallel` and
budget holds count a stream of any length, while a dead replica's leases still end after the TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .admission import Ticket
from .health import StoreHealth
from .types import QuotaLimits, Renewal

log = logging.getLogger("proxy.limits")

RENEW_FRACTION = 3  # a live request's leases are renewed every lease_ttl / 3 (checked twice as often)


class Renewer:
    def __init__(self, lease_ttl_ms: int, health: StoreHealth) -> None:
        self.lease_ttl_ms = lease_ttl_ms
        self.health = health
        self.live: dict[str, Ticket] = {}  # admitted, not yet settled: their leases are renewed

    def follow(self, ticket: Ticket) -> None:
        ticket.renewed_at = time.monotonic()
        self.live[ticket.request_id] = ticket

    def forget(self, ticket: Ticket) -> None:
        self.live.pop(ticket.request_id, None)

    async def renew_leases(self) -> int:
        """Renew the leases of every live request not renewed for lease_ttl / 3, in the store that
        admitted it; returns how many were renewed. A store that fails is retried next time; a
        request whose reservation is gone (settled, or expired while the store was away) is
        dropped from renewal."""
        due_before = time.monotonic() - self.lease_ttl_ms / 1000 / RENEW_FRACTION
        due = [t for t in self.live.values() if t.renewed_at <= due_before and not t.settled]
        if not due:
            return 0
        results = await asyncio.gather(*(self._renew(t) for t in due), return_exceptions=True)
        renewed = 0
        for ticket, result in zip(due, results, strict=True):
            if result is True:
                renewed += 1
            elif result is False:
                self.live.pop(ticket.request_id, None)
            elif isinstance(result, BaseException):  # a StoreError, or a driver surprise (logged)
                self.health.failed("renew", result, outage=False)
        return renewed

    async def _renew(self, ticket: Ticket) -> bool:
        started = time.monotonic()
        renewal = Renewal(
            ticket.request_id,
            ticket.team_scope,
            ticket.key_scope,
            ticket.decision.day,
            self.lease_ttl_ms,
            ticket.windows,
            ticket.user_scope,
            _chosen(ticket),
        )
        renewed = await ticket.store.renew(renewal)
        if renewed:
            ticket.renewed_at = started
        return renewed

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl_ms / 1000 / RENEW_FRACTION / 2)
            if self.live:
                try:
                    await self.renew_leases()
                except Exception:  # never let the renewer die
                    log.exception("lease renewal failed")


def _chosen(ticket: Ticket) -> tuple[tuple[QuotaLimits, ...], ...]:
    """The quota scopes of the candidate the ticket took (the only ones holding its leases)."""
    index = ticket.decision.target
    return () if index is None else (ticket.quota_scopes[index],)
