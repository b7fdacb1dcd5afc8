"""The limits of a key and of its team as the store takes them, built once per config.

The keyring builds one `Scopes` per key when a config is loaded, so a request carries the limits
of the snapshot it started on, and admission does no config arithmetic per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from decimal import Decimal

from ..config import Budget, Config, Key, Limits, Team
from ..pricing.cost import usd_to_micros
from .types import NO_END_USER, BudgetScope, ScopeKind, ScopeLimits, WindowBudget


def scope_limits(
    kind: ScopeKind, name: str, limits: Limits, budget_usd: Decimal | None, divisor: int = 1, alert_ratio: float = 1.0
) -> ScopeLimits:
    """One scope's limits, each divided by `divisor` (at least 1 where there is a limit)."""

    def part(value: int | None) -> int | None:
        return None if value is None else max(1, value // divisor)

    budget = None if budget_usd is None else max(1, usd_to_micros(budget_usd) // divisor)
    return ScopeLimits(
        kind=kind,
        name=name,
        rpm=part(limits.rpm),
        rpm_burst=part(limits.rpm_burst),
        tpm=part(limits.tpm),
        tpm_burst=part(limits.tpm_burst),
        max_parallel=part(limits.max_parallel),
        budget_micros=budget,
        alert_micros=None if budget is None else math.ceil(budget * alert_ratio),
        enforce=limits.enforce,
    )


def window_budgets(
    scope: BudgetScope, name: str, budgets: tuple[Budget, ...], divisor: int = 1, thresholds: tuple[float, ...] = ()
) -> tuple[WindowBudget, ...]:
    """The budgets of one scope as window budgets, each divided by `divisor` (at least 1 micro),
    with an alert at each threshold (a fraction of the budget)."""
    found = []
    for budget in budgets:
        micros = max(1, usd_to_micros(budget.usd) // divisor)
        alerts = tuple(math.ceil(micros * t) for t in thresholds)
        found.append(WindowBudget(scope, name, budget.window, micros, budget.enforce, alerts))
    return tuple(found)


def _day_budget(budgets: tuple[Budget, ...]) -> tuple[Decimal | None, tuple[Budget, ...]]:
    """A key's or team's enforced day budget (kept by the scope itself, and seeded into the
    fallback from what the store last reported), and its other budgets (window budgets)."""
    for budget in budgets:
        if budget.window == "day" and budget.enforce:
            return budget.usd, tuple(b for b in budgets if b is not budget)
    return None, budgets


@dataclass(frozen=True, slots=True)
class Scopes:
    """A key's and its team's limits, and every window budget that applies to its requests (the
    end users' with an empty name: `for_end_user` names them); the fallback ones are what one
    replica of `store.replicas` may admit while the shared store is out (`on_redis_error: allow`)."""

    key: ScopeLimits
    team: ScopeLimits
    fallback_key: ScopeLimits
    fallback_team: ScopeLimits
    windows: tuple[WindowBudget, ...] = ()
    fallback_windows: tuple[WindowBudget, ...] = ()
    end_user: tuple[WindowBudget, ...] = ()
    fallback_end_user: tuple[WindowBudget, ...] = ()
    user_limits: ScopeLimits = NO_END_USER  # each end user's rpm, tpm, max_parallel (unnamed)
    fallback_user_limits: ScopeLimits = NO_END_USER
    credential_id: str | None = None  # a runtime key's credential (its revocation fence); config keys: None
    share: float = 1.0  # the team's weight at a contended upstream quota (`teams.NAME.share`)

    def for_end_user(self, end_user: str | None) -> tuple[tuple[WindowBudget, ...], tuple[WindowBudget, ...]]:
        """The window budgets of a request from `end_user` (None: none known), and their fallback."""
        if not end_user or not self.end_user:
            return self.windows, self.fallback_windows
        return (
            self.windows + tuple(replace(w, name=end_user) for w in self.end_user),
            self.fallback_windows + tuple(replace(w, name=end_user) for w in self.fallback_end_user),
        )

    def user_for(self, end_user: str | None) -> tuple[ScopeLimits, ScopeLimits]:
        """The limits of `end_user` (none without a name or without end-user limits), and their fallback."""
        if not end_user or self.user_limits is NO_END_USER:
            return NO_END_USER, NO_END_USER
        return replace(self.user_limits, name=end_user), replace(self.fallback_user_limits, name=end_user)


def scopes_for(config: Config, key_name: str) -> Scopes:
    key = config.keys[key_name]
    return scopes_of(config, key_name, key, key.team, config.teams[key.team])


def scopes_of(
    config: Config, key_name: str, key: Key, team_name: str, team: Team, credential_id: str | None = None
) -> Scopes:
    """The scopes of a key and its team, config or runtime (`credential_id`: its fence)."""
    ratio, replicas = config.budget_alert_ratio, config.store.replicas
    thresholds = tuple(sorted(config.alerts.thresholds)) if config.alerts is not None else (ratio,)
    if config.alerts is not None:
        ratio = min(config.alerts.thresholds)
    key_day, key_windows = _day_budget(key.all_budgets())
    team_day, team_windows = _day_budget(team.all_budgets())
    org_budgets = config.org.all_budgets() if config.org is not None else ()
    end_user_budgets = team.end_users.all_budgets() if team.end_users is not None else ()
    user_limits, fallback_user_limits = NO_END_USER, NO_END_USER
    if team.end_users is not None and team.end_users.limits != Limits():
        user_limits = scope_limits("end_user", "", team.end_users.limits, None)
        fallback_user_limits = scope_limits("end_user", "", team.end_users.limits, None, replicas)

    def both(divisor: int) -> tuple[ScopeLimits, ScopeLimits]:
        return (
            scope_limits("key", key_name, key.limits, key_day, divisor, ratio),
            scope_limits("team", team_name, team.limits, team_day, divisor, ratio),
        )

    def windows(divisor: int) -> tuple[WindowBudget, ...]:
        return (
            window_budgets("org", "", org_budgets, divisor, thresholds)
            + window_budgets("team", team_name, team_windows, divisor, thresholds)
            + window_budgets("key", key_name, key_windows, divisor, thresholds)
        )

    (key_scope, team_scope), (fallback_key, fallback_team) = both(1), both(replicas)
    return Scopes(
        key_scope,
        team_scope,
        fallback_key,
        fallback_team,
        windows(1),
        windows(replicas),
        window_budgets("end_user", "", end_user_budgets, 1, thresholds),
        window_budgets("end_user", "", end_user_budgets, replicas, thresholds),
        user_limits,
        fallback_user_limits,
        credential_id,
        float(team.share),
    )
