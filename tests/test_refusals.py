"""What a refusal from the limiter means to the client (proxy/request/admit.py): the exact status,
error body and headers for every kind of refusal, as they were before the limiter stopped raising
HTTP errors itself."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from proxy.limits.admission import Refusal
from proxy.limits.scopes import Scopes
from proxy.limits.types import BucketState, Decision, ScopeLimits
from proxy.request.admit import refusal_error

KEY, TEAM = ScopeLimits("key", "alice"), ScopeLimits("team", "platform")
SCOPES = Scopes(KEY, TEAM, KEY, TEAM)
BUCKETS = {"requests": BucketState(60, 0, 1000), "tokens": BucketState(1000, 10, 60_000)}
RATE_HEADERS = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-limit-tokens": "1000",
    "x-ratelimit-remaining-tokens": "10",
    "x-ratelimit-reset-tokens": "1m0s",
}

DAY_END = int(datetime(2026, 12, 2, tzinfo=UTC).timestamp())  # when the budget day 2026-12-01 ends (UTC)

CASES = [
    (
        "rpm on the key",
        Decision(False, "rpm", "key", retry_after_ms=1500, **BUCKETS),
        429,
        {
            "message": "Rate limit reached for key 'alice' on requests per minute. Please try again in 1.5s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        {**RATE_HEADERS, "retry-after": "2", "retry-after-ms": "1500"},
    ),
    (
        "parallel on the team",
        Decision(False, "parallel", "team", retry_after_ms=1000, **BUCKETS),
        429,
        {
            "message": "Rate limit reached for team 'platform' on parallel requests. Please try again in 1s.",
            "type": "parallel_requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        {**RATE_HEADERS, "retry-after": "1", "retry-after-ms": "1000"},
    ),
    (
        "a request too large for tpm",
        Decision(False, "tpm", "key", never_fits=True, **BUCKETS),
        429,
        {
            "message": "Request too large for key 'alice': it needs more tokens per minute than the limit's capacity "
            "allows, so it can never be admitted. Reduce the prompt or max_tokens.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        {**RATE_HEADERS, "x-should-retry": "false"},
    ),
    (
        "the team's budget",
        Decision(
            False,
            "budget",
            "team",
            budget_spent_micros=4_990_000,
            budget_limit_micros=5_000_000,
            day="2026-12-01",
            day_reset_s=3723,
            **BUCKETS,
        ),
        429,
        {
            "message": "Team `platform` has spent $4.99 of its $5.00 daily budget; it resets at 2026-12-02T00:00:00Z.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
        {**RATE_HEADERS, "x-should-retry": "false"},
    ),
    (
        "the key's budget",
        Decision(
            False,
            "budget",
            "key",
            budget_spent_micros=120_000,
            budget_limit_micros=150_000,
            day="2026-12-01",
            day_reset_s=3723,
            **BUCKETS,
        ),
        429,
        {
            "message": "Key `alice` has spent $0.12 of its $0.15 daily budget; it resets at 2026-12-02T00:00:00Z.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
        {**RATE_HEADERS, "x-should-retry": "false"},
    ),
    (
        "no store, on_redis_error: deny",
        None,
        503,
        {
            "message": "The rate-limit store is unavailable; please retry shortly.",
            "type": "server_error",
            "param": None,
            "code": "store_unavailable",
        },
        {"retry-after": "1"},
    ),
]


@pytest.mark.parametrize(("case", "decision", "status", "error", "headers"), CASES, ids=[c[0] for c in CASES])
def test_a_refusal_becomes_the_clients_error(case, decision, status, error, headers) -> None:
    refused = refusal_error(Refusal(SCOPES, decision, resets_at=DAY_END))
    assert refused.status == status
    assert orjson.loads(refused.body_bytes()) == {"error": error}
    assert refused.headers == headers
