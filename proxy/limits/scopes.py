"""The limits of a key and of its team as the store takes them, built once per config.

The keyring builds one `Scopes` per key when a config is loaded, so a request carries the limits
of the snapshot it started on, and admission does no config arithmetic per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from ..config import Config, Key, Limits, Team
from ..pricing import usd_to_micros
from .types import ScopeKind, ScopeLimits


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
    )


@dataclass(frozen=True, slots=True)
class Scopes:
    """A key's and its team's limits; the fallback ones are what one replica of `store.replicas`
    may admit while the shared store is out (`on_redis_error: allow`)."""

    key: ScopeLimits
    team: ScopeLimits
    fallback_key: ScopeLimits
    fallback_team: ScopeLimits
    credential_id: str | None = None  # a runtime key's credential (its revocation fence); config keys: None


def scopes_for(config: Config, key_name: str) -> Scopes:
    key = config.keys[key_name]
    return scopes_of(config, key_name, key, key.team, config.teams[key.team])


def scopes_of(
    config: Config, key_name: str, key: Key, team_name: str, team: Team, credential_id: str | None = None
) -> Scopes:
    """The scopes of a key and its team, config or runtime (`credential_id`: its fence)."""
    ratio, replicas = config.budget_alert_ratio, config.store.replicas

    def both(divisor: int) -> tuple[ScopeLimits, ScopeLimits]:
        return (
            scope_limits("key", key_name, key.limits, key.daily_budget_usd, divisor, ratio),
            scope_limits("team", team_name, team.limits, team.daily_budget_usd, divisor, ratio),
        )

    (key_scope, team_scope), (fallback_key, fallback_team) = both(1), both(replicas)
    return Scopes(key_scope, team_scope, fallback_key, fallback_team, credential_id)
