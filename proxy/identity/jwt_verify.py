"""Verify a JWT against the identity provider's keys and read the caller's team and user.

RS256 and ES256 only; the algorithm must be the one its key is bound to (see jwks.py). `exp`,
`iss` and `aud` are required, `nbf` checked when present, all with `LEEWAY_S` of clock skew.

A signature check costs ~140 us of CPU, so a token that verified is remembered (in memory, up to
`VERIFIED_CACHE_SIZE` tokens, oldest dropped first) until its `exp` (plus the leeway): a client
sending the same token on every request pays for it once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

from ..config import JwtAuth
from .errors import TokenRejected
from .jwks import JwksCache

ALGORITHMS = frozenset({"RS256", "ES256"})
LEEWAY_S = 30
REQUIRED_CLAIMS = ["exp", "iss", "aud"]
VERIFIED_CACHE_SIZE = 10_000
_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def looks_like_jwt(presented: str) -> bool:
    """Three base64url segments, the first a JSON object (`eyJ`): never a proxy key (`sk-...`)."""
    return presented.startswith("eyJ") and _SHAPE.fullmatch(presented) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token names: the team (from `team_claim`) and end user (`user_claim`)."""

    team: str
    user: str


class JwtVerifier:
    def __init__(self, config: JwtAuth, jwks: JwksCache, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._jwks = jwks
        self._clock = clock
        self._verified: dict[str, tuple[Identity, float]] = {}  # token -> (identity, valid until)

    async def verify(self, token: str) -> Identity:
        """The token's identity; raises TokenRejected (never with the token in its message)."""
        known = self._verified.get(token)
        if known is not None:
            if self._clock() < known[1]:
                return known[0]
            del self._verified[token]
            raise TokenRejected("expired")
        identity, exp = await self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (identity, exp + LEEWAY_S)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except (DecodeError, ValueError, TypeError):
            raise TokenRejected("malformed") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALGORITHMS:
            raise TokenRejected("unsupported_algorithm")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("malformed", "no key id (kid) in its header")
        key = await self._jwks.key(kid)
        if key is None:
            raise TokenRejected("unknown_key")
        if key.algorithm != algorithm:
            raise TokenRejected("unsupported_algorithm", f"its key is for {key.algorithm}")
        claims = self._decode(token, key.key, algorithm)
        identity = Identity(self._claim(claims, self._config.team_claim), self._claim(claims, self._config.user_claim))
        exp = claims["exp"]
        return identity, float(exp) if isinstance(exp, int | float) else 0.0

    def _decode(self, token: str, key: object, algorithm: str) -> dict[str, object]:
        try:
            return jwt.decode(
                token,
                key,  # type: ignore[arg-type]  # a key the JWKS cache parsed: RSA or EC public key
                algorithms=[algorithm],
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=LEEWAY_S,
                options={"require": REQUIRED_CLAIMS, "verify_signature": True},
            )
        except ExpiredSignatureError:
            raise TokenRejected("expired") from None
        except ImmatureSignatureError:
            raise TokenRejected("not_yet_valid") from None
        except InvalidIssuerError:
            raise TokenRejected("wrong_issuer") from None
        except InvalidAudienceError:
            raise TokenRejected("wrong_audience") from None
        except InvalidSignatureError:
            raise TokenRejected("bad_signature") from None
        except MissingRequiredClaimError as exc:
            raise TokenRejected("missing_claim", exc.claim) from None
        except InvalidAlgorithmError:
            raise TokenRejected("unsupported_algorithm") from None
        except (InvalidTokenError, ValueError, TypeError):
            raise TokenRejected("malformed") from None

    @staticmethod
    def _claim(claims: dict[str, object], name: str) -> str:
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise TokenRejected("missing_claim", name)
        return value
