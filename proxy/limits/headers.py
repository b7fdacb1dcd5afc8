"""OpenAI's rate-limit headers and its duration format (`1s`, `6m0s`, `20ms`)."""

from __future__ import annotations

import math

from .types import Decision


def openai_duration(millis: int) -> str:
    """Go-style durations as OpenAI sends them: 20ms, 1s, 1.5s, 6m0s, 1h2m3s."""
    millis = max(0, int(millis))
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    headers = {}
    if decision.requests is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.requests.limit)
        headers["x-ratelimit-remaining-requests"] = str(decision.requests.remaining)
        headers["x-ratelimit-reset-requests"] = openai_duration(decision.requests.reset_ms)
    if decision.tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(decision.tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(decision.tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = openai_duration(decision.tokens.reset_ms)
    return headers


def retry_headers(retry_after_ms: int) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(retry_after_ms / 1000))), "retry-after-ms": str(max(0, retry_after_ms))}
