"""Find an upstream that answers: retries with backoff, then the model's next target.

Everything here happens before a byte reaches the client, so every failure is still retryable.
Non-retryable answers (2xx, and 4xx other than 429) are returned as they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import orjson

from ..config import Model
from ..errors import UpstreamError, UpstreamTimeout
from .retry import RETRYABLE_STATUSES, backoff_delay, server_delay

log = logging.getLogger("proxy.upstream")
CREDENTIALS_REFUSED = frozenset({401, 403})
from .upstream import UpstreamBroken, UpstreamClient, UpstreamConnectError, UpstreamReadTimeout, UpstreamResponse


@dataclass(slots=True)
class Attempts:
    """What it took to get an answer: for logs and metrics."""

    retries: int = 0
    reasons: list[tuple[str, str]] = field(default_factory=list)  # (upstream, reason) per retry
    errors: list[tuple[str, str]] = field(default_factory=list)  # (upstream, kind) per failed attempt
    upstream: str = ""
    target_model: str = ""
    upstream_started: float = 0.0  # the last attempt's start
    first_attempt_at: float = 0.0


async def open_upstream(
    path: str,
    body: dict,
    model: Model,
    upstreams: dict[str, UpstreamClient],
    headers: dict[str, str],
    deadline: float,
    attempts: Attempts,
) -> UpstreamResponse:
    """The first good (or non-retryable) upstream response; raises UpstreamError/UpstreamTimeout."""
    last_failure = "no upstream was tried"
    timed_out = False
    for target in model.targets:
        client = upstreams[target.upstream]
        payload = orjson.dumps({**body, "model": target.model})
        for attempt in range(client.config.max_retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout("The upstream did not answer before the request's deadline.")
            attempts.upstream, attempts.target_model = target.upstream, target.model
            attempts.upstream_started = time.monotonic()
            if not attempts.first_attempt_at:
                attempts.first_attempt_at = attempts.upstream_started
            wait: float | None = None
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
                if response.status in CREDENTIALS_REFUSED:
                    # the proxy's own upstream key was refused: not the client's to see (the body
                    # may quote part of that key) nor to blame on the client's key (401)
                    log.error("upstream %s refused the proxy's credentials (%d)", target.upstream, response.status)
                    response.close()
                    attempts.errors.append((target.upstream, f"http_{response.status}"))
                    last_failure, timed_out = f"upstream '{target.upstream}' refused the proxy's credentials", False
                    break  # the same key would be refused again: on to the next target
                if response.status not in RETRYABLE_STATUSES:
                    return response
                wait = server_delay(response.headers)
                response.close()
                kind, timed_out = f"http_{response.status}", False
                last_failure = f"upstream '{target.upstream}' answered {response.status}"
            attempts.errors.append((target.upstream, kind))
            if attempt == client.config.max_retries:
                break
            delay = wait if wait is not None else backoff_delay(attempt)
            if time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            attempts.retries += 1  # counted once it happens: a client may leave during the wait
            attempts.reasons.append((target.upstream, kind))
    if timed_out:
        raise UpstreamTimeout(f"The upstream did not answer in time ({last_failure}).")
    raise UpstreamError(f"The upstream failed: {last_failure}.")
