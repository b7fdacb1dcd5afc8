"""When and how long to wait before trying an upstream again."""

from __future__ import annotations

import random

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
BASE_DELAY_S = 0.25
MAX_DELAY_S = 8.0
MAX_SERVER_DELAY_S = 60.0


def server_delay(headers) -> float | None:
    """The wait an upstream asked for: `retry-after-ms` (OpenAI), else `Retry-After` seconds."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            value = float(millis) / 1000
            if 0 <= value <= MAX_SERVER_DELAY_S:
                return value
        except ValueError:
            pass
    seconds = headers.get("retry-after")
    if seconds:
        try:
            value = float(seconds)
            if 0 <= value <= MAX_SERVER_DELAY_S:
                return value
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return None


def backoff_delay(attempt: int, *, base: float = BASE_DELAY_S, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    ceiling = min(MAX_DELAY_S, base * (2**attempt))
    return (rng or random).uniform(0, ceiling)
