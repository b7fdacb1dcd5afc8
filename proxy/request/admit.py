"""The admit stage: reserve the call's worst case against its key's and team's limits and budgets.

The reservation is the estimated prompt plus the most the call may produce (`n` x `max_tokens`),
in tokens and in micro-dollars at the model's price; settlement later swaps it for what the
response really used. A refusal from the limiter becomes the client's error here: 429
`RateLimited` (a request, token or parallel limit) or `BudgetExceeded`, or 503
`StoreUnavailable` when the store is out and `on_redis_error: deny`, with OpenAI's headers.
"""

from __future__ import annotations

import time

from ..apis import anthropic_errors
from ..config import Model
from ..errors import BudgetExceeded, InvalidApiKey, ProxyError, RateLimited, StoreUnavailable
from ..http.responses import new_request_id
from ..limits.admission import Refusal, Ticket
from ..limits.headers import openai_duration, rate_limit_headers, retry_headers
from ..limits.limiter import Limiter, reserved_tokens
from ..pricing import format_usd, reservation_micros
from .authenticate import Caller
from .call import Call

LIMIT_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
LIMIT_TYPES = {"rpm": "requests", "tpm": "tokens", "parallel": "parallel_requests"}


async def admit(limiter: Limiter, caller: Caller, call: Call, model: Model | None) -> Ticket:
    """The ticket of an admitted call; raises the client's error for a refusal. Without a model
    (a read of a stored response) it counts one request and reserves nothing."""
    admitted = await limiter.admit(
        new_request_id(),
        caller.scopes,
        reserved_tokens(call.prompt_tokens, call.max_output),
        reservation_micros(model.price_per_mtok, call.prompt_tokens, call.max_output) if model else 0,
    )
    if isinstance(admitted, Refusal):
        error = refusal_error(admitted)
        if call.api == "anthropic" and admitted.decision is not None:
            error.headers |= anthropic_errors.rate_limit_headers(admitted.decision, now_ms())
        raise error
    return admitted


def now_ms() -> int:
    """For the RFC 3339 resets of Anthropic's headers (the bucket state's own clock gives the rest)."""
    return int(time.time() * 1000)


def refusal_error(refusal: Refusal) -> ProxyError:
    decision = refusal.decision
    if decision is None:
        return StoreUnavailable(
            "The rate-limit store is unavailable; please retry shortly.", headers={"retry-after": "1"}
        )
    if decision.reason == "revoked":  # the fence: revoked, expired or rotated out, by the store's clock
        return InvalidApiKey("Incorrect API key provided.")
    headers = rate_limit_headers(decision)
    scopes = refusal.scopes
    who = f"key '{scopes.key.name}'" if decision.scope == "key" else f"team '{scopes.team.name}'"
    if decision.reason == "budget":
        headers["x-should-retry"] = "false"
        return BudgetExceeded(
            f"Daily budget exceeded for {who}: spent {format_usd(decision.budget_spent_micros)} of "
            f"{format_usd(decision.budget_limit_micros)} on {decision.day}; the budget resets in "
            f"{openai_duration(decision.day_reset_s * 1000)}.",
            headers=headers,
        )
    reason = decision.reason or "rpm"
    limit_type = LIMIT_TYPES[reason]
    if decision.never_fits:
        headers["x-should-retry"] = "false"
        return RateLimited(
            f"Request too large for {who}: it needs more {LIMIT_NAMES[reason]} than the limit's capacity "
            "allows, so it can never be admitted. Reduce the prompt or max_tokens.",
            limit_type=limit_type,
            headers=headers,
        )
    headers.update(retry_headers(decision.retry_after_ms))
    return RateLimited(
        f"Rate limit reached for {who} on {LIMIT_NAMES[reason]}. Please try again in "
        f"{openai_duration(decision.retry_after_ms)}.",
        limit_type=limit_type,
        headers=headers,
    )
