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
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..background import stop_tasks
from ..config import Config
from ..errors import StoreError
from ..limits.admission import Ticket
from ..limits.days import BudgetCalendar
from ..limits.types import ScopeKind, Settled, Store, WindowBudget
from ..metrics import Metrics
from ..pricing.cost import format_usd, micros_to_usd, usd_to_micros
from ..snapshot import SnapshotHolder
from .refusal import usd_text
from .windows import ADJECTIVES, label_of_day

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("proxy.budgets.watch")

REFRESH_INTERVAL_S = 15.0
WEBHOOK_QUEUE = 1000
WEBHOOK_ATTEMPTS = 5
WEBHOOK_TIMEOUT_S = 5.0


class BudgetWatch:
    """Reads the running config (`snapshots`): budgets, alert ratio and webhook URL follow a reload."""

    def __init__(self, snapshots: SnapshotHolder, store: Store, metrics: Metrics, calendar: BudgetCalendar) -> None:
        self.snapshots = snapshots
        self.store = store
        self.metrics = metrics
        self.calendar = calendar
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._budgets: dict[tuple[ScopeKind, str], int] = {}
        self._budgets_for: Config | None = None

    @property
    def config(self) -> Config:
        return self.snapshots.config

    # -- the budgets of a config ----------------------------------------------------------------
    def budgets(self) -> dict[tuple[ScopeKind, str], int]:
        """(scope, name) → daily budget in micro-dollars, for every scope that has one."""
        found: dict[tuple[ScopeKind, str], int] = {}
        for name, team in self.config.teams.items():
            if team.daily_budget_usd is not None:
                found[("team", name)] = usd_to_micros(team.daily_budget_usd)
        for name, key in self.config.keys.items():
            if key.daily_budget_usd is not None:
                found[("key", name)] = usd_to_micros(key.daily_budget_usd)
        return found

    # -- after each settlement --------------------------------------------------------------------
    def on_settled(self, ticket: Ticket, settled: Settled) -> None:
        day = ticket.decision.day
        budgets = self._budgets_of_config()
        key, team = ticket.scopes.key, ticket.scopes.team
        for scope, name, spent, crossed in (
            (key.kind, key.name, settled.key_spent_micros, settled.key_crossed),
            (team.kind, team.name, settled.team_spent_micros, settled.team_crossed),
        ):
            budget = budgets.get((scope, name))  # the configured budget (a fallback ticket carries a share)
            if budget is None:
                continue
            if day == self.calendar.today():
                self.metrics.set_budget(scope, name, budget, spent)
            if crossed:
                self.alert(scope, name, spent, budget, day)
        windows = zip(ticket.shared_windows, settled.window_spent_micros, settled.window_crossed, strict=False)
        for w, window_spent, threshold in windows:
            if threshold:
                self.window_alert(w, window_spent, threshold, label_of_day(w.window, day))

    def _budgets_of_config(self) -> dict[tuple[ScopeKind, str], int]:
        if self._budgets_for is not self.config:
            self._budgets, self._budgets_for = self.budgets(), self.config
        return self._budgets

    def alert(self, scope: str, name: str, spent: int, budget: int, day: str) -> None:
        ratio = self.config.budget_alert_ratio
        log.warning(
            "budget alert: %s '%s' has spent %s of its %s budget on %s (alert ratio %.0f%%)",
            scope,
            name,
            format_usd(spent),
            format_usd(budget),
            day,
            ratio * 100,
        )
        self.metrics.set_alert(scope, name, True)
        if self._queue is not None and self._webhook_url():
            event = {
                "event": "budget_alert",
                "scope": scope,
                "name": name,
                "date": day,
                "spent_usd": str(micros_to_usd(spent)),
                "budget_usd": str(micros_to_usd(budget)),
                "ratio": round(spent / budget, 6),
                "alert_ratio": ratio,
                "time": datetime.now(UTC).isoformat(),
            }
            try:
                self._queue.put_nowait(event)
            except asyncio.QueueFull:
                log.error("budget webhook queue full: alert for %s '%s' dropped", scope, name)

    def _thresholds(self) -> list[float]:
        alerts = self.config.alerts
        return list(alerts.thresholds) if alerts is not None else [self.config.budget_alert_ratio]

    def _webhook_url(self) -> str | None:
        alerts = self.config.alerts
        return alerts.webhook_url if alerts is not None else self.config.alert_webhook_url

    def window_alert(self, w: WindowBudget, spent: int, crossed: int, period: str) -> None:
        """A window budget's spend crossed its `crossed`-th threshold (1-based) for the first time in
        `period`, across every replica (settle.lua's HSETNX). Names only: never a key."""
        thresholds = sorted(self._thresholds())
        threshold = thresholds[min(crossed, len(thresholds)) - 1]
        whose = "the organisation" if w.scope == "org" else f"{w.scope} '{w.name}'"
        text = (
            f"budget alert: {whose} has spent {usd_text(spent)} of its {usd_text(w.micros)} "
            f"{ADJECTIVES[w.window]} budget for {period} ({threshold:.0%} threshold)"
        )
        log.warning("%s", text)
        if self._queue is None or not self._webhook_url():
            return
        alerts = self.config.alerts
        event: dict[str, Any]
        if alerts is not None and alerts.format == "slack":
            event = {"text": text}
        else:
            event = {
                "event": "budget_alert",
                "scope": w.scope,
                "name": w.name,
                "window": w.window,
                "period": period,
                "spent_usd": str(micros_to_usd(spent)),
                "budget_usd": str(micros_to_usd(w.micros)),
                "threshold": threshold,
                "time": datetime.now(UTC).isoformat(),
            }
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.error("budget webhook queue full: alert for %s dropped", whose)

    # -- the shared ledger → gauges -------------------------------------------------------------
    async def refresh(self) -> None:
        budgets = self.budgets()
        day = self.calendar.today()
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
        # httpx and its client (~50 ms of imports, ~40 ms to load the CA bundle) only once an event
        # is due: most configs have no webhook, and every replica's start would pay for them
        client: httpx.AsyncClient | None = None
        try:
            while True:
                event = await self._queue.get()
                if client is None:
                    import httpx

                    client = httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S)
                for attempt in range(WEBHOOK_ATTEMPTS):
                    url = self._webhook_url()  # the running config's: a reload may change it
                    if not url:
                        break
                    try:
                        response = await client.post(url, json=event)
                        if response.status_code < 300:
                            break
                        failure = f"status {response.status_code}"
                    except httpx.HTTPError as exc:
                        failure = type(exc).__name__
                    if attempt + 1 == WEBHOOK_ATTEMPTS:
                        log.error("budget webhook gave up after %d attempts (%s)", WEBHOOK_ATTEMPTS, failure)
                    else:
                        await asyncio.sleep(random.uniform(0, min(30.0, 0.5 * 2**attempt)))
        finally:
            if client is not None:
                await client.aclose()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._refresh_forever()))
        self._queue = asyncio.Queue(WEBHOOK_QUEUE)
        self._tasks.append(loop.create_task(self._send_webhooks()))

    async def close(self) -> None:
        await stop_tasks(self._tasks, "budget watch")
        self._tasks.clear()
