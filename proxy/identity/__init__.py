"""Who is calling, from a JWT of the organisation's identity provider (`auth.jwt`).

looks_like_jwt(presented)          cheap: three base64url segments, never a proxy key (`sk-`)
JwksCache(jwt_config)              signing keys by `kid`, refreshed on an unknown `kid`
JwtVerifier(jwt_config, jwks)      `await verify(token)` -> Identity, or raises TokenRejected
"""

from .errors import TokenRejected
from .jwks import JwksCache
from .jwt_verify import Identity, JwtVerifier, looks_like_jwt

__all__ = ["Identity", "JwksCache", "JwtVerifier", "TokenRejected", "looks_like_jwt"]
