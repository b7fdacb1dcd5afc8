"""Settlement: swap a ticket's reservation for what the request really used, exactly once.

Never raises for a store outage: the settlement waits in the journal. A ticket the fallback
admitted is settled there (with its divided limits) and then in the shared store with the real
ones, so the shared ledger and budgets see every request. Shutdown waits for the open tickets.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from .admission import Ticket
from .health import StoreHealth
from .journal import Journal
from .types import QuotaLimits, Settled, Settlement, Store, Usage

log = logging.getLogger("proxy.limits")


class Settler:
    def __init__(self, store: Store, journal: Journal, health: StoreHealth) -> None:
        self.store = store
        self.journal = journal
        self.health = health
        self.unsettled = 0  # admitted requests not yet settled (shutdown waits for them)
        self._all_settled = asyncio.Event()
        self._all_settled.set()

    def opened(self) -> None:
        self.unsettled += 1
        self._all_settled.clear()

    async def settle(
        self,
        ticket: Ticket,
        model: str,
        usage: Usage,
        cost_micros: int,
        tags: tuple[tuple[str, str], ...] = (),
        succeeded: bool = True,
    ) -> Settled | None:
        """Reconcile the ticket once; None when it was settled already or the store is out."""
        if ticket.settled:
            return None
        ticket.settled = True
        try:
            return await self._settle(ticket, model, usage, cost_micros, tags, succeeded)
        finally:
            self.unsettled -= 1
            if self.unsettled == 0:
                self._all_settled.set()

    async def _settle(
        self,
        ticket: Ticket,
        model: str,
        usage: Usage,
        cost_micros: int,
        tags: tuple[tuple[str, str], ...],
        succeeded: bool,
    ) -> Settled | None:
        settlement = Settlement(
            ticket.request_id,
            ticket.team_scope,
            ticket.key_scope,
            model,
            ticket.decision.day,
            usage,
            cost_micros,
            tags,
            succeeded,
            windows=ticket.windows,
            end_user=ticket.end_user,
            user=ticket.user_scope,
            quotas=_chosen_only(ticket),
        )
        if ticket.degraded:
            await ticket.store.settle(settlement)  # the fallback store (limits / replicas) never fails
            # the shared store gets the real limits, alert thresholds too
            settlement = replace(
                settlement,
                key=ticket.scopes.key,
                team=ticket.scopes.team,
                windows=ticket.shared_windows,
                user=ticket.shared_user,
                quotas=ticket.quotas.shared,
            )
        try:
            settled = await self.store.settle(settlement)
            self.health.answered()
            return settled
        except Exception as exc:  # whatever failed, the spend waits in the journal
            self.health.failed("settle", exc)
            self.journal.add(settlement)
            return None

    async def all_settled(self, within_s: float) -> bool:
        """Wait up to `within_s` for every open ticket to settle; False if some did not."""
        if self.unsettled:
            try:
                await asyncio.wait_for(self._all_settled.wait(), within_s)
            except TimeoutError:
                return False
        return True


def _chosen_only(ticket: Ticket) -> tuple[tuple[QuotaLimits, ...], ...]:
    """Its candidates' quota scopes, the ones it did not take left out (the store settles only the
    taken one's, named by its place among the candidates)."""
    index = ticket.decision.target
    return tuple(scopes if i == index else () for i, scopes in enumerate(ticket.quota_scopes))
