"""Budget visibility: gauges from the shared ledger, and the soft-threshold alert.

The settle script reports, exactly once per scope and day across all replicas, the settlement
that pushed spend past `budget_alert_ratio` × budget. That one settlement logs a warning, sets
the alert gauge and (with `alert_webhook_url`) queues one webhook event. The webhook is retried
with backoff off the request path, never blocks a request, and carries names, never keys. It
goes to the `alert_webhook_url` of the running config: a reload that sets, changes or removes
the URL applies to the next event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import httpx

from .config import Config
from .limits.days import candidate_days
from .limits.limiter import Ticket
from .limits.types import Settled, Store, StoreError
from .metrics import Metrics
from .pricing import format_usd, micros_to_usd, usd_to_micros

log = logging.getLogger("proxy.budgets")

REFRESH_INTERVAL_S = 15.0
WEBHOOK_QUEUE = 1000
WEBHOOK_ATTEMPTS = 5
WEBHOOK_TIMEOUT_S = 5.0


class BudgetWatch:
    def __init__(self, config: Config, store: Store, metrics: Metrics):
        self.config = config
        self.store = store
        self.metrics = metrics
        self._queue: asyncio.Queue[dict] | None = None
        self._tasks: list[asyncio.Task] = []
        self._today, self._today_from, self._today_until = "", 0.0, 0.0
        self._today_zone = config.budget_timezone
        self._budgets: dict[tuple[str, str], int] = {}
        self._budgets_for: Config | None = None
        self.webhook_sent = 0
        self.webhook_failed = 0

    # -- the budgets of a config ----------------------------------------------------------------
    def budgets(self) -> dict[tuple[str, str], int]:
        """(scope, name) → daily budget in micro-dollars, for every scope that has one."""
        found = {}
        for name, team in self.config.teams.items():
            if team.daily_budget_usd is not None:
                found[("team", name)] = usd_to_micros(team.daily_budget_usd)
        for name, key in self.config.keys.items():
            if key.daily_budget_usd is not None:
                found[("key", name)] = usd_to_micros(key.daily_budget_usd)
        return found

    def today(self) -> str:
        clock_us = getattr(self.store, "clock_us", None)  # a store pinned to a test clock
        now = clock_us() / 1e6 if clock_us is not None else time.time()
        if not self._today_until > now >= self._today_from or self._today_zone != self.config.budget_timezone:
            self._today_zone = self.config.budget_timezone
            zone = ZoneInfo(self.config.budget_timezone)
            days = candidate_days(zone, datetime.fromtimestamp(now, zone))
            self._today, self._today_from, self._today_until = days.labels[1], days.starts[1], days.starts[2]
        return self._today

    # -- after each settlement --------------------------------------------------------------------
    def on_settled(self, ticket: Ticket, settled: Settled) -> None:
        day = ticket.decision.day
        budgets = self._budgets_of_config()
        for scope, name, spent, crossed in (
            ("key", ticket.caller.name, settled.key_spent_micros, settled.key_crossed),
            ("team", ticket.caller.team, settled.team_spent_micros, settled.team_crossed),
        ):
            budget = budgets.get((scope, name))  # the configured budget (a fallback ticket carries a share)
            if budget is None:
                continue
            if day == self.today():
                self.metrics.set_budget(scope, name, budget, spent)
            if crossed:
                self.alert(scope, name, spent, budget, day)

    def _budgets_of_config(self) -> dict[tuple[str, str], int]:
        if self._budgets_for is not self.config:
            self._budgets, self._budgets_for = self.budgets(), self.config
        return self._budgets

    def alert(self, scope: str, name: str, spent: int, budget: int, day: str) -> None:
        ratio = self.config.budget_alert_ratio
        log.warning("budget alert: %s '%s' has spent %s of its %s budget on %s (alert ratio %.0f%%)",
                    scope, name, format_usd(spent), format_usd(budget), day, ratio * 100)
        self.metrics.set_alert(scope, name, True)
        if self._queue is not None and self.config.alert_webhook_url:
            event = {"event": "budget_alert", "scope": scope, "name": name, "date": day,
                     "spent_usd": str(micros_to_usd(spent)), "budget_usd": str(micros_to_usd(budget)),
                     "ratio": round(spent / budget, 6), "alert_ratio": ratio,
                     "time": datetime.now(timezone.utc).isoformat()}
            try:
                self._queue.put_nowait(event)
            except asyncio.QueueFull:
                self.webhook_failed += 1
                log.error("budget webhook queue full: alert for %s '%s' dropped", scope, name)

    # -- the shared ledger → gauges -------------------------------------------------------------
    async def refresh(self) -> None:
        budgets = self.budgets()
        day = self.today()
        teams: dict[str, list[str]] = {team: [] for team in self.config.teams}
        for name, key in self.config.keys.items():
            teams.setdefault(key.team, []).append(name)
        spent = await self.store.budget_spent(day, teams)
        ratio = self.config.budget_alert_ratio
        for (scope, name), budget in budgets.items():
            used = spent.get((scope, name), 0)
            self.metrics.set_budget(scope, name, budget, used)
            self.metrics.set_alert(scope, name, used >= budget * ratio)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except StoreError:
                pass  # the limiter reports outages; gauges keep their last value
            await asyncio.sleep(REFRESH_INTERVAL_S)

    # -- webhook --------------------------------------------------------------------------------
    async def _send_webhooks(self) -> None:
        assert self._queue is not None
        async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as client:
            while True:
                event = await self._queue.get()
                for attempt in range(WEBHOOK_ATTEMPTS):
                    url = self.config.alert_webhook_url  # the running config's: a reload may change it
                    if not url:
                        break
                    try:
                        response = await client.post(url, json=event)
                        if response.status_code < 300:
                            self.webhook_sent += 1
                            break
                        failure = f"status {response.status_code}"
                    except httpx.HTTPError as exc:
                        failure = type(exc).__name__
                    if attempt + 1 == WEBHOOK_ATTEMPTS:
                        self.webhook_failed += 1
                        log.error("budget webhook gave up after %d attempts (%s)", WEBHOOK_ATTEMPTS, failure)
                    else:
                        await asyncio.sleep(random.uniform(0, min(30.0, 0.5 * 2**attempt)))

    # -- lifecycle ------------------------------------------------------------------------------
    def reconfigure(self, config: Config) -> None:
        """A reloaded config: budgets, alert ratio, time zone and webhook URL from now on."""
        self.config = config

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._refresh_forever()))
        self._queue = asyncio.Queue(WEBHOOK_QUEUE)
        self._tasks.append(loop.create_task(self._send_webhooks()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
