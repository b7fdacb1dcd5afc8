"""`proxy.apis.anthropic_errors`: our errors in Anthropic's shape, and its rate-limit headers."""

from __future__ import annotations

import orjson
import pytest
from anthropic.types.shared import ErrorResponse

from proxy import errors
from proxy.apis.anthropic_errors import anthropic_error, error_body, rate_limit_headers, rfc3339
from proxy.limits.types import BucketState, Decision


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (errors.InvalidRequest("bad"), 400, "invalid_request_error"),
        (errors.ContextLengthExceeded("too long"), 400, "invalid_request_error"),
        (errors.BodyTooLarge("big"), 413, "invalid_request_error"),
        (errors.MethodNotAllowed("no"), 405, "invalid_request_error"),
        (errors.InvalidApiKey("who"), 401, "authentication_error"),
        (errors.AdminRequired("admin"), 403, "permission_error"),
        (errors.ModelNotAllowed("not yours"), 403, "permission_error"),
        (errors.NotFound("none"), 404, "not_found_error"),
        (errors.ModelNotFound("none"), 404, "not_found_error"),
        (errors.RateLimited("slow", limit_type="tokens", headers={"retry-after": "3"}), 429, "rate_limit_error"),
        (errors.BudgetExceeded("spent"), 429, "rate_limit_error"),
        (errors.UpstreamQuotaReached("quota", limit_type="requests"), 429, "rate_limit_error"),
        (errors.UpstreamError("broken"), 502, "api_error"),
        (errors.StoreUnavailable("down"), 503, "api_error"),
        (errors.UpstreamTimeout("slow"), 504, "timeout_error"),
        (errors.ProxyError("bug"), 500, "api_error"),
    ],
)
def test_our_errors_map_to_anthropic_types(error, status, kind):
    got_status, body, headers = anthropic_error(error, request_id="req_1")
    parsed = ErrorResponse.model_validate(orjson.loads(body))
    assert (got_status, parsed.type, parsed.error.type, parsed.error.message) == (status, "error", kind, error.message)
    assert parsed.request_id == "req_1"
    assert set(orjson.loads(body)) == {"type", "error", "request_id"}
    assert set(orjson.loads(body)["error"]) == {"type", "message"}  # no OpenAI param/code leak through
    assert headers.get("x-should-retry") == ("false" if isinstance(error, errors.BudgetExceeded) else None)


def test_error_headers_are_kept():
    limited = errors.RateLimited("slow", limit_type="requests", headers={"retry-after": "2", "retry-after-ms": "1500"})
    assert anthropic_error(limited)[2] == {"retry-after": "2", "retry-after-ms": "1500"}


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (529, None, {"type": "error", "error": {"type": "overloaded_error", "message": "m"}}),
        (418, None, {"type": "error", "error": {"type": "api_error", "message": "m"}}),
        (400, "permission_error", {"type": "error", "error": {"type": "permission_error", "message": "m"}}),
    ],
)
def test_error_body(status, kind, expected):
    assert orjson.loads(error_body(status, "m", kind)) == expected


@pytest.mark.parametrize(
    ("epoch_ms", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1, "1970-01-01T00:00:01Z"),  # rounded up: a client never comes back before the reset
        (1000, "1970-01-01T00:00:01Z"),
        (1_796_164_800_500, "2026-12-01T22:40:01Z"),
    ],
)
def test_rfc3339(epoch_ms, text):
    assert rfc3339(epoch_ms) == text


def test_rate_limit_headers_from_the_tightest_buckets():
    now_ms = 1_796_164_800_000  # 2026-12-01T22:40:00Z
    decision = Decision(
        True,
        requests=BucketState(limit=60, remaining=59, reset_ms=1000),
        tokens=BucketState(limit=10_000, remaining=7_500, reset_ms=15_250),
    )
    assert rate_limit_headers(decision, now_ms) == {
        "anthropic-ratelimit-requests-limit": "60",
        "anthropic-ratelimit-requests-remaining": "59",
        "anthropic-ratelimit-requests-reset": "2026-12-01T22:40:01Z",
        "anthropic-ratelimit-tokens-limit": "10000",
        "anthropic-ratelimit-tokens-remaining": "7500",
        "anthropic-ratelimit-tokens-reset": "2026-12-01T22:40:16Z",
    }


def test_rate_limit_headers_without_buckets():
    assert rate_limit_headers(Decision(True), 0) == {}
    only_requests = rate_limit_headers(Decision(True, requests=BucketState(5, 0, 0)), 0)
    assert only_requests == {
        "anthropic-ratelimit-requests-limit": "5",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "1970-01-01T00:00:00Z",
    }
