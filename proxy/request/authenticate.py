"""The authenticate stage: who is calling, from the key presented.

Proxy keys are matched by their sha256 (a dict lookup, never a string compare): the config file's
keys first, then the runtime keys of the registry cache (memory only). Admin keys likewise, by
the sha256 of what is presented: the config's `admin_key_*` (unscoped) and its `admin_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..config import Config, Key, Limits, Team
from ..errors import InvalidApiKey
from ..limits.scopes import Scopes, scopes_for
from ..registry.permissions import Admin, admins_from_config

KEY_PREFIX = "sk-proxy-"


def sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated proxy key, by its config name (never by its secret), and its team."""

    key_name: str
    team_name: str
    key: Key
    team: Team
    allowed_models: frozenset[str] | None  # None: every model
    scopes: Scopes  # the limits admission checks, from the same config
    end_user: str | None = None  # who a JWT names (its user_claim); None for a proxy key

    @property
    def limits(self) -> Limits:
        return self.key.limits

    @property
    def max_wait_ms(self) -> int:
        """How long its refused requests may wait for capacity: the key's, else its team's (0: not at all)."""
        wait = self.key.limits.max_wait_ms
        return (self.team.limits.max_wait_ms or 0) if wait is None else wait

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


class RuntimeLookup(Protocol):
    """The registry's keys (proxy.request.runtime_keys.RuntimeKeys), asked after the config's."""

    def caller(self, sha256: str, config: Config) -> Caller | None: ...


class KeyRing:
    """sha256 hex → Caller, built once per config."""

    def __init__(
        self, config: Config, environ: Mapping[str, str] | None = None, runtime: RuntimeLookup | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.runtime = runtime
        self._by_hash: dict[str, Caller] = {}
        for name, key in config.keys.items():
            digest = key.sha256(env)
            if digest is None:  # its key_env is unset: the key cannot be used
                continue
            models = frozenset(key.models) if key.models is not None else None
            self._by_hash[digest] = Caller(
                name, key.team, key, config.teams[key.team], models, scopes_for(config, name)
            )
        self.admin_hash = config.admin_sha256(env)
        self.admins = admins_from_config(config, env)

    def authenticate(self, presented: str | None) -> Caller:
        if not presented:
            raise InvalidApiKey(
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        digest = sha256_hex(presented)
        caller = self._by_hash.get(digest)
        if caller is None and self.runtime is not None:
            caller = self.runtime.caller(digest, self.config)
        if caller is None:
            raise InvalidApiKey("Incorrect API key provided.")
        return caller

    def admin(self, presented: str | None) -> Admin | None:
        """The admin key presented, by name and scope; None when it is not one."""
        return self.admins.get(sha256_hex(presented)) if presented else None

    def is_admin(self, presented: str | None) -> bool:
        if not presented or self.admin_hash is None:
            return False
        return hmac.compare_digest(sha256_hex(presented), self.admin_hash)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer KEY`, `api-key: KEY` (Azure style) or `x-api-key: KEY`
    (Anthropic style)."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    api_key = headers.get("api-key") or headers.get("x-api-key")
    return api_key.strip() if api_key else None
