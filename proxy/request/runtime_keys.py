"""Runtime keys (the registry, proxy.registry) as callers of the authenticate stage.

`RuntimeKeys.caller(sha256, config)` answers from the replica's `RegistryCache` (memory only, no
store round trip): the key's entry, its team (from the config file, else a runtime team) and its
limits as `Scopes` carrying the credential's fence id. The `Caller` is built once per credential
and reused until the entry, its team or the config changes.
"""

from __future__ import annotations

from ..config import Config, EndUsers, Key, Team
from ..limits.scopes import scopes_of
from ..registry import CachedKey, KeyEntry, RegistryCache, TeamEntry
from .authenticate import Caller

NO_DIGEST = "0" * 64  # a report's stand-in for a key with no credential left (never shown)


def config_key_of(entry: KeyEntry, sha256: str) -> Key:
    """A runtime key in the config's own shape, so the request path treats it like any key."""
    return Key(
        team=entry.team,
        key_sha256=sha256,
        limits=entry.limits,
        models=entry.models,
        daily_budget_usd=entry.budgets.daily_usd,
        priority=entry.priority,
    )


def config_team_of(entry: TeamEntry) -> Team:
    defaults = entry.end_user_defaults
    end_users = None
    if defaults.limits != defaults.limits.__class__() or defaults.budgets.daily_usd is not None:
        limits = defaults.limits.model_copy(update={"max_wait_ms": None})  # end users wait as their key does
        end_users = EndUsers(limits=limits, daily_budget_usd=defaults.budgets.daily_usd)
    return Team(
        limits=entry.limits,
        daily_budget_usd=entry.budgets.daily_usd,
        end_users=end_users,
        share=entry.share,
        max_queue=entry.max_queue,
    )


class RuntimeKeys:
    def __init__(self, cache: RegistryCache) -> None:
        self.cache = cache
        # sha256 -> (what it was built from, the caller)
        self._memo: dict[str, tuple[tuple[object, object, object], Caller]] = {}

    def team(self, name: str, config: Config) -> Team | None:
        """A team by name: the config file's first, then the registry's."""
        team = config.teams.get(name)
        if team is not None:
            return team
        entry = self.cache.team(name)
        return None if entry is None else config_team_of(entry)

    def caller(self, sha256: str, config: Config) -> Caller | None:
        hit = self.cache.lookup(sha256)
        if hit is None:
            self._memo.pop(sha256, None)
            return None
        source = (hit, config.teams.get(hit.team) or self.cache.team(hit.team), config)
        memo = self._memo.get(sha256)
        if memo is not None and all(a is b for a, b in zip(memo[0], source, strict=True)):
            return memo[1]
        caller = self._build(hit, sha256, config)
        if caller is not None:
            self._memo[sha256] = (source, caller)
        return caller

    def _build(self, hit: CachedKey, sha256: str, config: Config) -> Caller | None:
        team = self.team(hit.team, config)
        if team is None:  # its team was deleted (or is not loaded yet)
            return None
        key = config_key_of(hit.entry, sha256)
        models = frozenset(key.models) if key.models is not None else None
        scopes = scopes_of(config, hit.name, key, hit.team, team, hit.credential_id)
        return Caller(hit.name, hit.team, key, team, models, scopes)


def with_runtime(config: Config, runtime: RuntimeKeys | None) -> Config:
    """`config` with the registry's teams and keys beside its own (for reports, not for serving)."""
    if runtime is None or not (runtime.cache.keys or runtime.cache.teams):
        return config
    teams = {name: config_team_of(t) for name, t in runtime.cache.teams.items()} | dict(config.teams)
    keys = {
        name: config_key_of(k, k.credentials[0].sha256 if k.credentials else NO_DIGEST)
        for name, k in runtime.cache.keys.items()
        if k.team in teams
    } | dict(config.keys)
    return config.model_copy(update={"teams": teams, "keys": keys})


def only_team(config: Config, team: str) -> Config:
    """`config` narrowed to one team and its keys (what a team-scoped admin may read)."""
    return config.model_copy(
        update={
            "teams": {n: t for n, t in config.teams.items() if n == team},
            "keys": {n: k for n, k in config.keys.items() if k.team == team},
        }
    )
