"""Anthropic's side of errors and rate-limit headers, from the proxy's own errors and bucket states.

our error (status)                              Anthropic type
InvalidRequest, ContextLengthExceeded (400)     invalid_request_error
BodyTooLarge (413)                              invalid_request_error
MethodNotAllowed (405), ClientClosedRequest     invalid_request_error
InvalidApiKey (401)                             authentication_error
AdminRequired, ModelNotAllowed (403)            permission_error
NotFound, ModelNotFound (404)                   not_found_error
RateLimited, BudgetExceeded (429)               rate_limit_error (a budget adds x-should-retry: false)
UpstreamError (502)                             api_error
StoreUnavailable (503), any other               api_error
UpstreamTimeout (504)                           timeout_error
an upstream's 529                               overloaded_error
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson

from ..errors import BudgetExceeded, ProxyError
from ..limits.types import BucketState, Decision

ERROR_TYPES = {  # our status -> Anthropic's error type
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
DEFAULT_ERROR_TYPE = "api_error"


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, DEFAULT_ERROR_TYPE)


def error_body(status: int, message: str, error_type: str | None = None, request_id: str | None = None) -> bytes:
    """{"type": "error", "error": {"type", "message"}} (+ "request_id" when given); the type from
    the status unless named."""
    body: dict[str, object] = {
        "type": "error",
        "error": {"type": error_type or error_type_for(status), "message": message},
    }
    if request_id is not None:
        body["request_id"] = request_id
    return orjson.dumps(body)


def anthropic_error(error: ProxyError, request_id: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of one of our errors, told the Anthropic way; the error's own
    headers (retry-after, rate-limit state) are kept, and a budget refusal is marked not retryable."""
    headers = dict(error.headers)
    if isinstance(error, BudgetExceeded):
        headers["x-should-retry"] = "false"
    return error.status, error_body(error.status, error.message, request_id=request_id), headers


def rfc3339(epoch_ms: int) -> str:
    """A UTC instant as RFC 3339 to the second, rounded up: 2026-12-01T22:00:05Z."""
    seconds = math.ceil(epoch_ms / 1000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bucket_headers(kind: str, bucket: BucketState, now_ms: int) -> dict[str, str]:
    return {
        f"anthropic-ratelimit-{kind}-limit": str(bucket.limit),
        f"anthropic-ratelimit-{kind}-remaining": str(max(0, bucket.remaining)),
        f"anthropic-ratelimit-{kind}-reset": rfc3339(now_ms + max(0, bucket.reset_ms)),
    }


def rate_limit_headers(decision: Decision, now_ms: int) -> dict[str, str]:
    """anthropic-ratelimit-requests-* and -tokens-* of the tightest buckets, as
    `proxy.limits.headers.rate_limit_headers` gives the OpenAI ones; reset is the instant the
    bucket is full again (`now_ms` + its reset_ms), in RFC 3339."""
    headers: dict[str, str] = {}
    if decision.requests is not None:
        headers |= _bucket_headers("requests", decision.requests, now_ms)
    if decision.tokens is not None:
        headers |= _bucket_headers("tokens", decision.tokens, now_ms)
    return headers
