"""Why a token was refused: one exception with a reason code and a message that never holds
the token (nor any of its claims' values)."""

from __future__ import annotations

from typing import Literal

Reason = Literal[
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "bad_signature",
    "unknown_key",
    "unsupported_algorithm",
    "malformed",
    "missing_claim",
]

MESSAGES: dict[Reason, str] = {
    "expired": "The token has expired.",
    "not_yet_valid": "The token is not valid yet (nbf is in the future).",
    "wrong_issuer": "The token was issued by an issuer this proxy does not trust.",
    "wrong_audience": "The token is not meant for this proxy (wrong audience).",
    "bad_signature": "The token's signature does not verify.",
    "unknown_key": "The token was signed by a key the identity provider does not publish.",
    "unsupported_algorithm": "The token's algorithm is not accepted (RS256 and ES256 only).",
    "malformed": "The token is malformed.",
    "missing_claim": "The token lacks a required claim.",
}


class TokenRejected(Exception):
    """A JWT that does not identify anyone; `reason` says why, `message` is safe to return."""

    def __init__(self, reason: Reason, detail: str | None = None) -> None:
        self.reason: Reason = reason
        self.message = MESSAGES[reason] if detail is None else f"{MESSAGES[reason][:-1]}: {detail}."
        super().__init__(self.message)
