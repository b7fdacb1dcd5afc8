"""What an upstream's answer says about its own rate limits: how long to stop sending it requests.

    a 429                       hold for `retry-after-ms`, else `retry-after` (seconds or an
                                HTTP date), else the reset of an exhausted limit, else 1 s
    any other answer whose      hold until that limit's reset:
    remaining count is 0          OpenAI   x-ratelimit-remaining-{requests,tokens}
                                           x-ratelimit-reset-{requests,tokens}  ("1s", "6m0s", "20ms")
                                  Anthropic anthropic-ratelimit-{requests,tokens,input-tokens,
                                           output-tokens}-remaining / -reset (RFC 3339 instants)

Pure: the caller gives the wall clock (Anthropic's resets are instants) and caps the hold. A header
that does not parse is ignored, as if it were absent: the answer itself is never at stake.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from ..limits.types import HoldKind as HoldKind  # defined with the store's holds, re-exported

DEFAULT_429_HOLD_S = 1.0  # a 429 that says nothing about when: hold about as long as a backoff
RATE_LIMITED = 429
_NUMBER = r"\d+(?:\.\d+)?"
OPENAI_DURATION = re.compile(
    rf"^(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m(?!s))?(?:(?P<s>{_NUMBER})s)?(?:(?P<ms>{_NUMBER})ms)?$"
)
SECONDS = re.compile(rf"^{_NUMBER}$")
OPENAI_LIMITS: tuple[tuple[HoldKind, str, str], ...] = (
    ("requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
)
ANTHROPIC_LIMITS: tuple[tuple[HoldKind, str, str], ...] = (
    ("requests", "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("tokens", "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
    ("tokens", "anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset"),
    ("tokens", "anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset"),
)


@dataclass(frozen=True, slots=True)
class ProviderHold:
    seconds: float  # > 0
    kind: HoldKind  # which of the provider's limits ran out (a bare 429 counts as requests)


def openai_duration_s(text: str) -> float | None:
    """`1s` -> 1.0, `6m0s` -> 360.0, `20ms` -> 0.02, `1h2m3.5s`; a bare number is seconds."""
    text = text.strip()
    if SECONDS.match(text):
        return float(text)
    found = OPENAI_DURATION.match(text)
    if not text or found is None:
        return None
    hours, minutes, seconds, millis = (float(found.group(part) or 0) for part in ("h", "m", "s", "ms"))
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def instant_s(text: str, now_s: float) -> float | None:
    """Seconds from `now_s` (epoch) to an RFC 3339 instant (`2026-12-01T22:00:05Z`)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now_s


def retry_after_s(headers: Mapping[str, str], now_s: float) -> float | None:
    """`retry-after-ms`, else `retry-after` as seconds or as an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis is not None and SECONDS.match(millis.strip()):
        return float(millis) / 1000
    seconds = headers.get("retry-after")
    if seconds is None:
        return None
    if SECONDS.match(seconds.strip()):
        return float(seconds)
    try:
        return parsedate_to_datetime(seconds).timestamp() - now_s
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _exhausted(remaining: str | None) -> bool:
    return remaining is not None and remaining.strip() == "0"


def _exhausted_limits(api: str, headers: Mapping[str, str], now_s: float) -> list[ProviderHold]:
    """Each exhausted limit with a reset that parses, as a hold until that reset."""
    limits = ANTHROPIC_LIMITS if api == "anthropic" else OPENAI_LIMITS
    holds = []
    for kind, remaining, reset in limits:
        if not _exhausted(headers.get(remaining)):
            continue
        text = headers.get(reset)
        if text is None:
            continue
        seconds = instant_s(text, now_s) if api == "anthropic" else openai_duration_s(text)
        if seconds is not None and math.isfinite(seconds) and seconds > 0:
            holds.append(ProviderHold(seconds, kind))
    return holds


def provider_hold(api: str, status: int, headers: Mapping[str, str], now_s: float) -> ProviderHold | None:
    """How long the upstream asked (or showed) that no more requests be sent, if it did."""
    exhausted = _exhausted_limits(api, headers, now_s)
    longest = max(exhausted, key=lambda hold: hold.seconds, default=None)
    if status != RATE_LIMITED:
        return longest
    kind: HoldKind = longest.kind if longest is not None else "requests"
    asked = retry_after_s(headers, now_s)
    if asked is not None and math.isfinite(asked) and asked >= 0:
        return ProviderHold(asked, kind) if asked > 0 else longest  # `retry-after: 0`: try again now
    return longest or ProviderHold(DEFAULT_429_HOLD_S, kind)
