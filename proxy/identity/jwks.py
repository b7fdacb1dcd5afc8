"""The identity provider's signing keys by `kid`: loaded from `jwks_url` or `jwks_file`, kept in
memory, and reloaded when a token names a `kid` we do not know (the IdP rotated its keys).

A known `kid` costs a dict lookup. A reload is single-flight and happens at most once per
`MIN_REFRESH_INTERVAL_S`, so a flood of tokens with made-up `kid`s cannot hammer the IdP; a failed
reload keeps the keys we had. Only RSA keys (RS256) and EC P-256 keys (ES256) are kept, each bound
to its one algorithm, so a token cannot choose how its key is used (no algorithm confusion).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from ..config import JwtAuth

MIN_REFRESH_INTERVAL_S = 5.0
FETCH_TIMEOUT_S = 3.0
MAX_JWKS_BYTES = 1024 * 1024

log = logging.getLogger("proxy.identity")


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str  # "RS256" or "ES256": the only one this key verifies
    key: Any  # a cryptography public key


def parse_jwks(document: object) -> dict[str, SigningKey]:
    """The usable keys of a JWKS document by kid (others are skipped: HMAC, other curves, no kid)."""
    keys: dict[str, SigningKey] = {}
    members = document.get("keys") if isinstance(document, dict) else None
    for member in members if isinstance(members, list) else ():
        if not isinstance(member, dict) or not isinstance(member.get("kid"), str):
            continue
        if member.get("kty") == "RSA":
            algorithm = "RS256"
        elif member.get("kty") == "EC" and member.get("crv") == "P-256":
            algorithm = "ES256"
        else:
            continue
        if member.get("alg") not in (None, algorithm) or member.get("use") not in (None, "sig"):
            continue
        try:
            jwk = PyJWK(member, algorithm)
        except PyJWTError:
            continue
        keys[member["kid"]] = SigningKey(member["kid"], algorithm, jwk.key)
    return keys


class JwksCache:
    """kid -> SigningKey; `await start()` loads once (a failure is logged, not raised)."""

    def __init__(
        self,
        config: JwtAuth,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_refresh_interval_s: float = MIN_REFRESH_INTERVAL_S,
    ) -> None:
        self._url = config.jwks_url
        self._file = config.jwks_file
        self._clock = clock
        self._interval = min_refresh_interval_s
        self._keys: dict[str, SigningKey] = {}
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # reloads attempted (tests and metrics)

    async def start(self) -> None:
        await self.refresh()

    def known(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    async def key(self, kid: str) -> SigningKey | None:
        """The key for `kid`, reloading the set first if it is unknown and a reload is allowed."""
        found = self._keys.get(kid)
        if found is not None:
            return found
        await self.refresh()
        return self._keys.get(kid)

    async def refresh(self) -> bool:
        """Reload the key set unless one was attempted in the last interval; True if reloaded."""
        attempted = self._last_attempt
        async with self._lock:
            if self._last_attempt != attempted:  # another caller reloaded while we waited
                return False
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._interval:
                return False
            self._last_attempt = now
            self.fetches += 1
            try:
                document = await self._load()
            except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:
                log.warning("jwks reload failed (%s); keeping %d keys", type(exc).__name__, len(self._keys))
                return False
            keys = parse_jwks(document)
            if not keys:
                log.warning("jwks reload found no RS256/ES256 keys; keeping %d keys", len(self._keys))
                return False
            self._keys = keys
            return True

    async def _load(self) -> object:
        if self._file is not None:
            return json.loads(await asyncio.to_thread(_read_head, Path(self._file), MAX_JWKS_BYTES))
        assert self._url is not None
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self._url) as response:
            response.raise_for_status()
            body = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError("jwks document too large")
            return json.loads(body)


def _read_head(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit)
