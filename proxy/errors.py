"""Every exception the proxy raises on purpose, in one tree (private helpers aside).

    Exception
    ├── ConfigError                   a config that cannot be used; `problems`, one per line
    ├── StoreError                    the rate-limit store could not answer (Redis down, timeout)
    │   └── StoreUnreachable          ... and the call was never sent, so it did not apply
    ├── RespError                     the lean Redis client (`proxy.limits.resp`)
    │   ├── RespConnectionError       the connection failed or timed out
    │   │   └── RespUnreachable       ... before the command was written
    │   └── RespReplyError            Redis answered with an error reply
    ├── UpstreamFailure               the seam to upstream HTTP (`proxy.upstream.client`)
    │   ├── UpstreamConnectError      no connection could be made (refused, DNS, connect timeout)
    │   ├── UpstreamReadTimeout       the upstream stopped sending for longer than its read timeout
    │   └── UpstreamBroken            the connection broke while the response was being read
    ├── TokenRejected                 a JWT that identifies no one (`proxy.identity`); `reason`
    ├── RegistryError         400     runtime keys and teams (`proxy.registry`); `status`, `code`
    │   ├── RegistryNotFound  404     not_found
    │   ├── ManagedByConfig   409     managed_by_config (the name belongs to the config file)
    │   ├── NameTaken         409     name_taken (a runtime entry has it)
    │   ├── RegistryConflict  409     conflict (changed concurrently, or still in use)
    │   ├── RegistryUnknownTeam 400   unknown_team
    │   └── RegistryUnavailable 503   store_unavailable (the store did not answer)
    └── ProxyError                    an answer to the client, shaped as OpenAI shapes its own:
        │                             {"error": {"message", "type", "param", "code"}}
        ├── InvalidRequest      400     invalid_request_error
        │   └── ContextLengthExceeded   400 context_length_exceeded
        ├── InvalidApiKey       401     invalid_api_key
        ├── AdminRequired       403     admin_key_required
        │   └── OutOfScope      403     out_of_scope (a team-scoped admin key, another team)
        ├── UnknownTeam         403     unknown_team (a JWT whose team claim names no team)
        ├── ModelNotAllowed     403     model_not_allowed
        ├── NotFound            404     not_found (unknown route)
        │   └── ModelNotFound   404     model_not_found
        ├── MethodNotAllowed    405     method_not_allowed
        ├── BodyTooLarge        413     request_too_large
        ├── ClientClosedRequest 499     the client left mid-body (nginx's code; nobody reads the answer)
        ├── RateLimited         429     type requests | tokens | parallel_requests
        │   ├── UpstreamHeld    429     the provider's own limit ran out: held until its reset
        │   └── UpstreamQuotaReached 429 no candidate target's upstream quota has room
        ├── BudgetExceeded      429     insufficient_quota, never retried
        ├── UpstreamError       502     upstream_error
        ├── StoreUnavailable    503     store_unavailable
        └── UpstreamTimeout     504     upstream_timeout

Only the `ProxyError` family reaches a client; the others are caught at their seam (the store's
driver errors become `StoreError` there, the request path turns `StoreError` and the upstream
failures into `ProxyError`s). The in-process store's `CommandError` (a Lua `redis.call` error)
stays private to `proxy.limits.keyspace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` are `path: message` lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# -- identity from JWTs ---------------------------------------------------------------------------
TokenReason = Literal[
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

TOKEN_MESSAGES: dict[TokenReason, str] = {
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

    def __init__(self, reason: TokenReason, detail: str | None = None) -> None:
        self.reason: TokenReason = reason
        self.message = TOKEN_MESSAGES[reason] if detail is None else f"{TOKEN_MESSAGES[reason][:-1]}: {detail}."
        super().__init__(self.message)


# -- runtime keys and teams: messages name entries, never a key or a digest -----------------------
class RegistryError(Exception):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class RegistryNotFound(RegistryError):
    status = 404
    code = "not_found"


class ManagedByConfig(RegistryError):
    status = 409
    code = "managed_by_config"


class NameTaken(RegistryError):
    status = 409
    code = "name_taken"


class RegistryConflict(RegistryError):
    status = 409
    code = "conflict"


class RegistryUnknownTeam(RegistryError):
    status = 400
    code = "unknown_team"


class RegistryUnavailable(RegistryError):
    status = 503
    code = "store_unavailable"


# -- the rate-limit store -------------------------------------------------------------------------
class StoreError(Exception):
    """The store could not answer (Redis down, timeout). Raised by every store operation."""


class StoreUnreachable(StoreError):
    """The store was not reached at all: the operation was never sent, so it did not apply."""


class RespError(Exception):
    """The lean Redis client failed; the store wraps it as `StoreError`."""


class RespConnectionError(RespError):
    """The connection failed, broke or timed out (the command may have reached Redis)."""


class RespUnreachable(RespConnectionError):
    """No connection to send on (none could be made in time, or backing off): not sent."""


class RespReplyError(RespError):
    """Redis answered with an error reply (e.g. NOSCRIPT)."""


# -- the upstream ---------------------------------------------------------------------------------
class UpstreamFailure(Exception):
    """The upstream could not be reached or did not send a whole response."""


class UpstreamConnectError(UpstreamFailure):
    """No connection could be made (refused, DNS, connect timeout)."""


class UpstreamReadTimeout(UpstreamFailure):
    """The upstream stopped sending for longer than its read timeout."""


class UpstreamBroken(UpstreamFailure):
    """The connection broke while the response was being read."""


# -- answers to the client ------------------------------------------------------------------------


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"

    @classmethod
    def invalid_type(cls, param: str, expected: str, value: object) -> InvalidRequest:
        """OpenAI's wording for a field of the wrong JSON type (code `invalid_type`)."""
        return cls(
            f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.",
            param=param,
            code="invalid_type",
        )


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class AdminRequired(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "admin_key_required"


class OutOfScope(AdminRequired):
    code = "out_of_scope"


class UnknownTeam(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "unknown_team"


class ModelNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ClientClosedRequest(ProxyError):
    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


@dataclass(frozen=True, slots=True)
class Retry:
    """When a rate-limited request could be admitted, for the queue (`proxy.request.queue`).

    `after_ms` is exact for a request or token bucket and a provider's hold; for a parallel slot
    (`exact=False`) it is only a time to look again, since a slot frees when a request ends.
    `blockers` name what refused it (`("key", name)`, `("team", name)`, `("end_user", team, name)`,
    `("target", upstream, model)`, `("team_target", team, upstream, model)`: a team's fair share of
    a target's quota): a waiter behind it that shares one does not overtake it."""

    after_ms: int
    exact: bool
    blockers: frozenset[tuple[str, ...]]


class RateLimited(ProxyError):
    """429 for a request, token or parallel bucket; `type` is set per refusal. `retry`: when it
    could be admitted (None: never, as it is)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, limit_type: str, headers: dict[str, str] | None = None, retry: Retry | None = None
    ):
        super().__init__(message, headers=headers)
        self.type = limit_type
        self.retry = retry


class UpstreamHeld(RateLimited):
    """Every target of the model is held: its provider answered 429 or showed a limit at zero."""


class UpstreamQuotaReached(RateLimited):
    """No candidate target of the model has room in its upstream quota (`upstreams.NAME.limits`,
    a target's `limits`)."""


class BudgetExceeded(ProxyError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


def json_type(value: object) -> str:
    """A JSON value's type as OpenAI's errors name it ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
