"""What happened to one request, and who gets told: the JSON request log (and metrics)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Protocol

import orjson

from .errors import (
    BodyTooLarge,
    BudgetExceeded,
    ContextLengthExceeded,
    InvalidApiKey,
    ModelNotAllowed,
    ModelNotFound,
    ProxyError,
    RateLimited,
    UpstreamHeld,
    UpstreamQuotaReached,
)
from .limits.types import Usage
from .request.forward import Attempts

if TYPE_CHECKING:
    from .limits.admission import Ticket
    from .request.authenticate import Caller

RATE_LIMIT_REASONS = {"requests": "rpm", "tokens": "tpm", "parallel_requests": "parallel"}


def rejection_reason(error: ProxyError) -> str | None:
    if isinstance(error, (UpstreamHeld, UpstreamQuotaReached)):  # the provider's capacity, told or ours
        return "upstream"
    if isinstance(error, RateLimited):
        return RATE_LIMIT_REASONS.get(error.type, "rpm")
    if isinstance(error, BudgetExceeded):
        return "budget"
    if isinstance(error, InvalidApiKey):
        return "auth"
    if isinstance(error, (ModelNotAllowed, ModelNotFound)):
        return "model"
    if isinstance(error, ContextLengthExceeded):
        return "context"
    if isinstance(error, BodyTooLarge):
        return "body"
    return None


@dataclass(slots=True)
class Outcome:
    request_id: str
    endpoint: str
    started_at: float  # time.monotonic() when the request arrived
    caller: Caller | None = None
    model: str = ""
    stream: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    ticket: Ticket | None = None
    attempts: Attempts = field(default_factory=Attempts)
    status: int = 0
    error_code: str | None = None
    rejection: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_micros: int = 0
    first_byte_at: float = 0.0  # the first relayed byte of a stream
    upstream_finished_at: float = 0.0  # the upstream's last byte (or the stream's end)
    finished_at: float = 0.0  # settled, or refused
    stream_error: str | None = None
    client_gone: bool = False
    queued_s: float = 0.0  # how long it waited in the queue for capacity
    fallback_from: str | None = None  # the model asked for, when its budget fallback (`model`) took the request
    request_body: dict[str, Any] | None = None  # only with log_bodies: true
    response_body: bytes | None = None

    def fail(self, error: ProxyError) -> None:
        self.status = error.status
        self.error_code = error.code or error.type
        self.rejection = rejection_reason(error)
        if not self.finished_at:
            self.finished_at = time.monotonic()


class Observer(Protocol):
    def admitted(self, outcome: Outcome) -> None: ...

    def finished(self, outcome: Outcome) -> None: ...


class RequestLog:
    """One JSON line per request on stdout: no secrets, no message content."""

    def __init__(self, level: str = "info", stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout
        self.set_level(level)
        self._default = lambda value: repr(value)

    def set_level(self, level: str) -> None:
        """Request lines are info: written at `info` and `debug`, not at `warning` or `error`."""
        self.enabled = logging.getLevelName(level.upper()) <= logging.INFO

    def admitted(self, outcome: Outcome) -> None:
        pass

    def finished(self, outcome: Outcome) -> None:
        if not self.enabled:
            return
        caller = outcome.caller
        line: dict[str, object] = {
            "event": "request",
            "request_id": outcome.request_id,
            "endpoint": outcome.endpoint,
            "team": caller.team_name if caller else None,
            "key": caller.key_name if caller else None,
            "model": outcome.model or None,
            "upstream": outcome.attempts.upstream or None,
            "status": outcome.status,
            "stream": outcome.stream,
            "prompt_tokens": outcome.usage.prompt_tokens,
            "completion_tokens": outcome.usage.completion_tokens,
            "cached_tokens": outcome.usage.cached_tokens,
            "cost_usd": outcome.cost_micros / 1_000_000,
            "duration_ms": round((outcome.finished_at - outcome.started_at) * 1000, 2),
            "ttft_ms": round((outcome.first_byte_at - outcome.started_at) * 1000, 2) if outcome.first_byte_at else None,
            "retries": outcome.attempts.retries,
            "rejection": outcome.rejection,
            "error": outcome.error_code or outcome.stream_error,
            "client_gone": outcome.client_gone or None,
            "queued_ms": round(outcome.queued_s * 1000, 2) if outcome.queued_s else None,
        }
        if outcome.request_body is not None:
            line["request_body"] = outcome.request_body
        if outcome.response_body is not None:
            line["response_body"] = outcome.response_body.decode("utf-8", "replace")
        self._stream.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE, default=self._default).decode())
        self._stream.flush()


class Observers:
    def __init__(self, *observers: Observer):
        self.observers = observers

    def admitted(self, outcome: Outcome) -> None:
        for observer in self.observers:
            if hasattr(observer, "admitted"):
                observer.admitted(outcome)

    def finished(self, outcome: Outcome) -> None:
        for observer in self.observers:
            observer.finished(outcome)
