"""Callers from the organisation's JWTs (`auth.jwt`): no proxy key per person.

A verified token names a team (`team_claim`: a config or runtime team, else 403 `unknown_team`)
and an end user (`user_claim`). The caller's key scope is the end user, `user:<name>`, under the
team's `end_users` limits and budget (none: unlimited), so the team's limits and budgets and the
per-end-user ones apply in the one admit script. A token refused is a 401 saying why, never
echoing the token. Verified tokens are remembered until their `exp` (proxy.identity), and each
(team, user) caller is built once per config and team entry.
"""

from __future__ import annotations

from urllib.parse import quote

from ..config import Config, Key, Limits
from ..errors import InvalidApiKey, UnknownTeam
from ..identity import JwtVerifier, TokenRejected, looks_like_jwt
from ..limits.scopes import scopes_of
from .authenticate import Caller, KeyRing
from .runtime_keys import RuntimeKeys

MAX_CALLERS = 10_000
END_USER_PREFIX = "user:"  # key names cannot hold ':' (NAME_PATTERN, config): no collision


def end_user_scope(user: str) -> str:
    """The end user's scope name: its characters that could join two key names escaped."""
    return END_USER_PREFIX + quote(user, safe="@._-+")


class JwtCallers:
    def __init__(self, verifier: JwtVerifier, runtime: RuntimeKeys) -> None:
        self.verifier = verifier
        self.runtime = runtime
        self._memo: dict[tuple[str, str], tuple[tuple[object, object], Caller]] = {}

    async def caller(self, token: str, config: Config) -> Caller:
        try:
            identity = await self.verifier.verify(token)
        except TokenRejected as rejected:
            raise InvalidApiKey(f"Invalid token: {rejected.message}") from None
        team = self.runtime.team(identity.team, config)
        if team is None:
            raise UnknownTeam(f"The token's team {identity.team!r} is not a team of this proxy.")
        source = (config, config.teams.get(identity.team) or self.runtime.cache.team(identity.team))
        memo = self._memo.get((identity.team, identity.user))
        if memo is not None and all(a is b for a, b in zip(memo[0], source, strict=True)):
            return memo[1]
        end_users = team.end_users
        name = end_user_scope(identity.user)
        key = Key(
            team=identity.team,
            key_sha256="0" * 64,  # never looked up: a stand-in for the config's shape
            limits=end_users.limits if end_users else Limits(),
            daily_budget_usd=end_users.daily_budget_usd if end_users else None,
        )
        scopes = scopes_of(config, name, key, identity.team, team)
        caller = Caller(name, identity.team, key, team, None, scopes, end_user=identity.user)
        if len(self._memo) >= MAX_CALLERS:
            self._memo.clear()
        self._memo[(identity.team, identity.user)] = (source, caller)
        return caller


async def identify(keyring: KeyRing, config: Config, presented: str | None, jwt: JwtCallers | None) -> Caller:
    """The caller of a request: a JWT when `auth.jwt` is set and one is presented, else a key."""
    if jwt is not None and presented and looks_like_jwt(presented):
        return await jwt.caller(presented, config)
    return keyring.authenticate(presented)
