"""The admit stage: reserve the call's worst case against its key's and team's limits and budgets,
and against the upstream quotas of the first candidate target with room.

The reservation is the estimated prompt plus the most the call may produce (`n` x `max_tokens`),
in tokens and in micro-dollars at the model's price; settlement later swaps it for what the
response really used. A refusal from the limiter becomes the client's error here: 429
`RateLimited` (a request, token or parallel limit), `UpstreamQuotaReached` (no candidate target's
upstream quota has room: retry when the first frees) or `BudgetExceeded`, or 503
`StoreUnavailable` when the store is out and `on_redis_error: deny`, with OpenAI's headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from ..apis import anthropic_errors
from ..budgets.refusal import ScopeKind, budget_refusal, safe_name, usd_text
from ..budgets.windows import ADJECTIVES
from ..config import Config, Model, Target
from ..errors import (
    BudgetExceeded,
    InvalidApiKey,
    ProxyError,
    RateLimited,
    Retry,
    StoreUnavailable,
    UpstreamQuotaReached,
)
from ..http.responses import new_request_id
from ..limits.admission import Refusal, Ticket
from ..limits.headers import openai_duration, rate_limit_headers, retry_headers
from ..limits.limiter import Limiter, reserved_tokens
from ..limits.quotas import NO_QUOTAS, QuotaCandidates
from ..limits.types import Decision, WindowBudget
from ..pricing.cost import reservation_micros
from .authenticate import Caller
from .call import Call
from .end_user import end_user_of

log = logging.getLogger("proxy.limits")

LIMIT_NAMES = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "parallel requests"}
LIMIT_TYPES = {"rpm": "requests", "tpm": "tokens", "parallel": "parallel_requests"}


async def admit(
    limiter: Limiter,
    caller: Caller,
    call: Call,
    model: Model | None,
    config: Config,
    headers: Mapping[str, str],
    quotas: QuotaCandidates = NO_QUOTAS,
) -> Ticket:
    """The ticket of an admitted call; raises the client's error for a refusal. Without a model
    (a read of a stored response) it counts one request and reserves nothing. With `quotas`, the
    ticket's `decision.target` is the candidate target it took."""
    scopes = caller.scopes
    # a JWT names its end user (its claim); otherwise the request may (safety_identifier, user, header)
    end_user = caller.end_user or end_user_of(call.body, headers, config.end_user_identity)
    admitted = await limiter.admit(
        new_request_id(),
        scopes,
        reserved_tokens(call.prompt_tokens, call.max_output),
        reservation_micros(model.price_per_mtok, call.prompt_tokens, call.max_output) if model else 0,
        end_user,
        quotas,
    )
    if isinstance(admitted, Refusal):
        error = refusal_error(admitted)
        if call.api == "anthropic" and admitted.decision is not None:
            error.headers |= anthropic_errors.rate_limit_headers(admitted.decision, now_ms())
        raise error
    if admitted.decision.shadow:
        shadow_refusals(admitted.shadow_windows, caller.team_name)
    for shadow in admitted.decision.shadow_limits:
        scope, _, reason = shadow.partition(":")
        whose = {"key": f"key {caller.key_name}", "team": f"team {caller.team_name}"}.get(scope, "an end user")
        log.warning("shadow mode: the %s limit of %s would have refused a request", LIMIT_NAMES[reason], whose)
    return admitted


def now_ms() -> int:
    """For the RFC 3339 resets of Anthropic's headers (the bucket state's own clock gives the rest)."""
    return int(time.time() * 1000)


def shadow_refusals(windows: Sequence[WindowBudget], team: str) -> None:
    """Log the budgets in shadow mode (`enforce: false`) that would have refused this request."""
    for w in windows:
        whose = {"org": "the organisation", "end_user": "an end user"}.get(w.scope, f"{w.scope} {w.name}")
        log.warning(
            "shadow mode: the %s budget of %s (%s) would have refused a request of team %s",
            ADJECTIVES[w.window],
            whose,
            usd_text(w.micros),
            team,
        )


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
    window = refusal.window
    if window is not None:
        headers["x-should-retry"] = "false"
        name = scopes.team.name if window.scope == "team" else window.name
        message = budget_refusal(
            window.scope, name, decision.window_spent_micros, window.micros, window.window, refusal.resets_at
        )
        return BudgetExceeded(message, headers=headers)
    if decision.scope == "upstream":
        return upstream_quota_refusal(decision, refusal.quotas.targets, headers, scopes.team.name)
    if decision.reason == "budget":  # the key's or team's enforced day budget
        headers["x-should-retry"] = "false"
        kind: ScopeKind = "key" if decision.scope == "key" else "team"
        message = budget_refusal(
            kind,
            scopes.key.name if kind == "key" else scopes.team.name,
            decision.budget_spent_micros,
            decision.budget_limit_micros,
            "day",
            refusal.resets_at,
        )
        return BudgetExceeded(message, headers=headers)
    who = f"key '{scopes.key.name}'" if decision.scope == "key" else f"team '{scopes.team.name}'"
    if decision.scope == "end_user":
        who = f"end user '{safe_name(refusal.user.name)}'"
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
        retry=Retry(decision.retry_after_ms, reason != "parallel", frozenset({refusing_scope(refusal)})),
    )


def upstream_quota_refusal(
    decision: Decision, targets: Sequence[Target], headers: dict[str, str], team: str
) -> UpstreamQuotaReached:
    """No candidate target's upstream quota has room (or none for `team` now, its fair share
    taken while other teams wait): named by the one that frees first."""
    reason = decision.reason or "rpm"
    limit_type = LIMIT_TYPES.get(reason, "tokens")
    if decision.never_fits or decision.target is None:
        headers["x-should-retry"] = "false"
        names = ", ".join(f"'{t.upstream}'" for t in targets)
        return UpstreamQuotaReached(
            f"Request too large for the upstream quotas of {names}: it needs more tokens per minute than "
            "any of them allows, so it can never be admitted. Reduce the prompt or max_tokens.",
            limit_type=limit_type,
            headers=headers,
        )
    target = targets[decision.target]
    others = " (and every other target of the model)" if len(targets) > 1 else ""
    headers.update(retry_headers(decision.retry_after_ms))
    if reason == "share":
        # room in the quota, but other teams waiting for it are behind their share: only this team's
        # own waiters for these targets queue behind this one (the others' turn is exactly what it
        # waits for, and its waiters for other targets are not held up)
        return UpstreamQuotaReached(
            f"Rate limit reached for the upstream quota of '{target.upstream}' (model '{target.model}'){others}: "
            f"other teams are waiting for it and team '{team}' has had its share for now. Please try again in "
            f"{openai_duration(decision.retry_after_ms)}.",
            limit_type="tokens",
            headers=headers,
            retry=Retry(
                decision.retry_after_ms, False, frozenset(("team_target", team, t.upstream, t.model) for t in targets)
            ),
        )
    return UpstreamQuotaReached(
        f"Rate limit reached for the upstream quota of '{target.upstream}' (model '{target.model}'){others} "
        f"on {LIMIT_NAMES[reason]}. Please try again in {openai_duration(decision.retry_after_ms)}.",
        limit_type=limit_type,
        headers=headers,
        # a caller that may wait (limits.max_wait_ms) queues on every candidate target, as for a hold
        retry=Retry(
            decision.retry_after_ms, reason != "parallel", frozenset(("target", t.upstream, t.model) for t in targets)
        ),
    )


def refusing_scope(refusal: Refusal) -> tuple[str, ...]:
    """What refused, as the queue names it: ("key", name), ("team", name) or ("end_user", team, name)."""
    scopes, scope = refusal.scopes, refusal.decision.scope if refusal.decision else None
    if scope == "end_user":
        return ("end_user", scopes.team.name, refusal.user.name)
    return ("key", scopes.key.name) if scope == "key" else ("team", scopes.team.name)
