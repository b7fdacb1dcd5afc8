"""The forward stage: find an upstream that answers, with retries and then the model's fallbacks.

Each of the model's targets is tried in order, each up to its upstream's `max_retries + 1`
times, waiting what the upstream asked for (`retry-after-ms`, `Retry-After`) or an exponential
backoff with full jitter, all within the client's own deadline. Everything here happens before
a byte reaches the client, so every failure is still retryable. Non-retryable answers (2xx, and
4xx other than 429) are returned as they are; a buffered answer is read whole here.

Admission may have taken a target's upstream quota: then the targets start at that one, and a later
one with a quota of its own is never tried (`UpstreamQuotas.forward_targets`). A target its
provider has said is out of capacity (`holds`) is skipped for the next one without
being sent anything; when every target left is held, a short hold is waited out, a longer one
refuses the request (`proxy.request.holds`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..config import Model, Target
from ..errors import UpstreamBroken, UpstreamConnectError, UpstreamError, UpstreamReadTimeout, UpstreamTimeout
from ..upstream.client import UpstreamClient, UpstreamResponse
from ..upstream.hop_by_hop import forwarded_headers
from .call import Call
from .holds import HOLD_WAIT_S, ProviderHolds

log = logging.getLogger("proxy.upstream")
CREDENTIALS_REFUSED = frozenset({401, 403})
# after the upstream's base_url: OpenAI's ends with /v1, Anthropic's (as its SDK takes it) does not
PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
    "messages": "/v1/messages",
    "count_tokens": "/v1/messages/count_tokens",
}
ANTHROPIC_VERSION = "2023-06-01"  # when the client names none
OVERLOADED = 529  # Anthropic's overloaded_error: retried, then passed on as it came
DROP_REQUEST_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "authorization",
        "api-key",
        "x-api-key",
        "accept-encoding",
        "cookie",
        "x-proxy-tags",
        "x-proxy-priority",
        "openai-organization",
        "openai-project",
        "x-forwarded-for",
        "x-real-ip",
    }
)
DEFAULT_DEADLINE_S = 600.0


@dataclass(slots=True)
class Attempts:
    """What it took to get an answer: for logs and metrics."""

    retries: int = 0
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (upstream, reason) per retry
    errors: list[tuple[str, str]] = field(default_factory=list)  # (upstream, kind) per failed attempt
    upstream: str = ""
    target_model: str = ""
    last_attempt_at: float = 0.0
    first_attempt_at: float = 0.0


def upstream_body(call: Call) -> dict[str, Any]:
    """The body to send on: a stream always asks for usage (the relay drops it if the client did not)."""
    body = call.body
    if call.stream and call.endpoint in ("chat", "completions"):
        options = body.get("stream_options") or {}
        body = {**body, "stream_options": {**options, "include_usage": True}}
    return body


def upstream_headers(headers: Mapping[str, str], request_id: str, api: str = "openai") -> dict[str, str]:
    """The client's headers that go on (no credentials, no hop-by-hop ones), with our request id;
    an Anthropic call names its API version (the client's, else the default)."""
    kept = forwarded_headers(headers.items(), DROP_REQUEST_HEADERS)
    kept["x-request-id"] = request_id
    if api == "anthropic" and "anthropic-version" not in kept:
        kept["anthropic-version"] = ANTHROPIC_VERSION
    return kept


def deadline_of(headers: Mapping[str, str]) -> float:
    """The client's own timeout (the OpenAI SDKs send it) bounds our retries."""
    budget = DEFAULT_DEADLINE_S
    hint = headers.get("x-stainless-timeout")
    if hint:
        try:
            budget = min(budget, max(1.0, float(hint)))
        except ValueError:
            pass
    return time.monotonic() + budget


async def fetch(
    call: Call,
    model: Model,
    body: dict[str, Any],
    headers: dict[str, str],
    deadline: float,
    attempts: Attempts,
    upstreams: dict[str, UpstreamClient],
    holds: ProviderHolds,
    targets: list[Target] | None = None,
) -> tuple[UpstreamResponse, bytes | None]:
    """The upstream's answer: its whole body, or (payload None) a stream ready to relay. `targets`
    (default: the model's) are where it may go: only the target holding a pinned call's previous
    response, or from the one whose upstream quota admission took."""
    targets = targets if targets is not None else model.targets
    response = await open_upstream(PATHS[call.endpoint], body, targets, upstreams, headers, deadline, attempts, holds)
    if call.stream and response.status == 200:
        return response, None
    try:
        return response, await response.read()
    except UpstreamReadTimeout:
        attempts.errors.append((attempts.upstream, "timeout"))
        raise UpstreamTimeout("The upstream timed out while sending its response.") from None
    except UpstreamBroken:
        attempts.errors.append((attempts.upstream, "broken"))
        raise UpstreamError("The upstream broke off its response.") from None
    except asyncio.CancelledError:
        response.close()
        raise


async def open_upstream(
    path: str,
    body: dict[str, Any],
    targets: list[Target],
    upstreams: dict[str, UpstreamClient],
    headers: dict[str, str],
    deadline: float,
    attempts: Attempts,
    holds: ProviderHolds,
) -> UpstreamResponse:
    """The first good (or non-retryable) upstream response; raises UpstreamError/UpstreamTimeout,
    or UpstreamHeld when every target left is held for longer than a short wait."""
    overloaded: list[UpstreamResponse] = []  # the last 529, passed on if nothing better comes
    try:
        return await _first_answer(path, body, targets, upstreams, headers, deadline, attempts, holds, overloaded)
    except BaseException:
        _close(overloaded[0] if overloaded else None)
        raise


async def _first_answer(
    path: str,
    body: dict[str, Any],
    targets: list[Target],
    upstreams: dict[str, UpstreamClient],
    headers: dict[str, str],
    deadline: float,
    attempts: Attempts,
    holds: ProviderHolds,
    overloaded: list[UpstreamResponse],
) -> UpstreamResponse:
    last_failure = "no upstream was tried"
    timed_out = False
    for index, target in enumerate(targets):
        if not await _until_free(holds, targets, index, deadline):
            continue  # held: a later target is free
        client = upstreams[target.upstream]
        payload = orjson.dumps({**body, "model": target.model})
        for attempt in range(client.config.max_retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout("The upstream did not answer before the request's deadline.")
            attempts.upstream, attempts.target_model = target.upstream, target.model
            attempts.last_attempt_at = time.monotonic()
            if not attempts.first_attempt_at:
                attempts.first_attempt_at = attempts.last_attempt_at
            wait: float | None = None
            kind: str
            try:
                response = await client.send("POST", path, payload, headers, read_timeout=remaining)
            except UpstreamConnectError as exc:
                log.warning("upstream %s: connect failed: %s", target.upstream, exc)
                kind, last_failure, timed_out = "connect", f"could not connect to upstream '{target.upstream}'", False
            except UpstreamReadTimeout:
                kind, last_failure, timed_out = "timeout", f"upstream '{target.upstream}' timed out", True
            except UpstreamBroken as exc:
                log.warning("upstream %s: connection broke: %s", target.upstream, exc)
                kind, last_failure, timed_out = "broken", f"upstream '{target.upstream}' broke the connection", False
            else:
                holds.follow(target, client.config.api, client.config.max_hold_s, response.status, response.headers)
                if response.status in CREDENTIALS_REFUSED:
                    # the proxy's own upstream key was refused: not the client's to see (the body
                    # may quote part of that key) nor to blame on the client's key (401)
                    log.error("upstream %s refused the proxy's credentials (%d)", target.upstream, response.status)
                    response.close()
                    attempts.errors.append((target.upstream, f"http_{response.status}"))
                    last_failure, timed_out = f"upstream '{target.upstream}' refused the proxy's credentials", False
                    break  # the same key would be refused again: on to the next target
                if response.status not in RETRYABLE_STATUSES:
                    _close(overloaded.pop() if overloaded else None)
                    return response
                wait = server_delay(response.headers)
                if response.status == OVERLOADED and attempt == client.config.max_retries:
                    _close(overloaded.pop() if overloaded else None)
                    overloaded.append(response)
                else:
                    response.close()
                kind, timed_out = f"http_{response.status}", False
                last_failure = f"upstream '{target.upstream}' answered {response.status}"
            attempts.errors.append((target.upstream, kind))
            if attempt == client.config.max_retries:
                break
            if holds.remaining(target) > 0:  # its provider said when: another target, or that wait
                if not await _until_free(holds, targets, index, deadline):
                    break
            else:
                delay = wait if wait is not None else backoff_delay(attempt)
                if time.monotonic() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
            attempts.retries += 1  # counted once it happens: a client may leave during the wait
            attempts.reasons.append((target.upstream, kind))
    if overloaded:
        return overloaded.pop()
    if timed_out:
        raise UpstreamTimeout(f"The upstream did not answer in time ({last_failure}).")
    raise UpstreamError(f"The upstream failed: {last_failure}.")


async def _until_free(holds: ProviderHolds, targets: list[Target], index: int, deadline: float) -> bool:
    """True once `targets[index]` may be sent to (now, or after a short hold); False to skip it for
    a later target that is free. Raises UpstreamHeld when it and every later target are held
    longer than `HOLD_WAIT_S` (or past the deadline)."""
    held = holds.remaining(targets[index])
    if held <= 0:
        return True
    if holds.any_free(targets[index + 1 :]):
        return False
    if held > HOLD_WAIT_S or time.monotonic() + held >= deadline:
        raise holds.refusal(targets[index:])
    await asyncio.sleep(held)
    return True


def _close(response: UpstreamResponse | None) -> None:
    if response is not None:
        response.close()


# -- when and how long to wait before trying again ------------------------------------------------
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, OVERLOADED})
BASE_DELAY_S = 0.25
MAX_DELAY_S = 8.0
MAX_SERVER_DELAY_S = 60.0


def server_delay(headers: Mapping[str, str]) -> float | None:
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
