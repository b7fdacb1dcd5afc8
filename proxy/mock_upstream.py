"""A deterministic mock of the OpenAI and Anthropic APIs, with fault injection, for demos and tests.

Replies are `chunks` words ("word0 word1 ..."), capped by the request's max_tokens. Every /v1
request is logged and consumes one fault (the `x-mock-fault` header first, else the FIFO queue).
The usage sums in `/_mock/stats` count only usage the mock actually reported in a response.

Besides chat, completions, embeddings and models it serves the Responses API (POST /v1/responses,
plain and streamed; GET and DELETE /v1/responses/{id}, GET ?stream=true[&starting_after=N] to
stream a response's events again, POST .../cancel, GET .../input_items for the responses it
created) and the Anthropic Messages API (POST /v1/messages, plain and streamed;
POST /v1/messages/count_tokens), whose errors are Anthropic-shaped. The wire formats are built in
`proxy.mocks`; the faults apply to every route alike (a `status` of 529 is Anthropic's
overloaded_error; `error_after_chunks` ends a stream with the API's error event).

A quota of its own, like a provider account's (`POST /_mock/quota {"requests": N, "tokens": T,
"window_s": S}`, or `--quota-requests N --quota-tokens T --quota-window-s S`, either or both): N
requests per fixed window of S seconds from the window's first request, and T tokens per S seconds
as a bucket that starts full and refills continuously (T/S a second, as providers replenish token
limits). A request's tokens are the usage its answer reports (prompt + completion, computed
before answering; counted even under a `no_usage` fault), so a proxy that reserves the prompt
estimate + max_tokens and settles the reported usage never holds less than the mock does. Each
answer shows what is left (OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`,
Anthropic's `anthropic-ratelimit-{requests,tokens}-*` with an RFC 3339 reset), and past either a
429 with `retry-after` (and OpenAI's `retry-after-ms`), counted in the stats as `rate_limited`.

Control endpoints: GET|DELETE /_mock/requests, GET|DELETE /_mock/stats, POST|DELETE /_mock/faults,
POST|DELETE /_mock/quota.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import math
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .mocks import anthropic as anthropic_api
from .mocks import responses as responses_api
from .mocks.common import Script, Tally, text_tokens

DEFAULT_CHUNKS = 16
EMBEDDING_DIMENSIONS = 8
FAULT_HEADER = "x-mock-fault"
MAX_LOGGED_REQUESTS = 100_000  # the oldest are dropped, so long benchmarks stay bounded
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")

FAULT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "status": int,
    "retry_after": str,
    "retry_after_ms": str,
    "first_byte_delay_s": (int, float),
    "cut_after_chunks": int,
    "cut_in_one_write": bool,  # with cut_after_chunks: those chunks and the close in one write
    "malformed_json": bool,
    "bad_sse_line": bool,
    "no_usage": bool,
    "close_connection": bool,
    "cached_tokens": int,
    "usage_multiplier": (int, float),
    "chunks": int,
    "chunk_delay_s": (int, float),
    "reasoning_tokens": int,  # chat and Responses: reasoning output tokens (within the completion)
    "cache_write_tokens": int,  # input tokens written to the cache (chat: prompt_tokens_details)
    "error_after_chunks": int,  # Responses and Anthropic streams: the API's error event after N deltas
    "headers": dict,  # extra response headers (string values), e.g. a provider's rate-limit headers
}
ANTHROPIC_PREFIX = "/v1/messages"
ANTHROPIC_VERSION_HEADER = "anthropic-version"

ERROR_KINDS = {  # status -> (type, code), as OpenAI answers
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def validate_fault(fault: Any) -> dict[str, Any]:
    """Return `fault` if it is a fault object, else raise ValueError naming the problem."""
    if not isinstance(fault, dict):
        raise ValueError(f"a fault must be a JSON object, got {fault!r}")
    for name, value in fault.items():
        expected = FAULT_FIELDS.get(name)
        if expected is None:
            raise ValueError(f"unknown fault field {name!r}")
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ValueError(f"fault field {name!r} has the wrong type: {value!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in fault.get("headers", {}).items()):
        raise ValueError("fault field 'headers' must map header names to strings")
    return fault


def error_body(status: int, message: str) -> bytes:
    kind, code = ERROR_KINDS.get(status, ("server_error", None))
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message), content_type="application/json", headers=headers
    )


def is_anthropic(request: web.Request) -> bool:
    return request.path == ANTHROPIC_PREFIX or request.path.startswith(ANTHROPIC_PREFIX + "/")


def api_error(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in the shape of the API the request addressed (Anthropic's for /v1/messages...)."""
    if not is_anthropic(request):
        return error_response(status, message, headers)
    headers = dict(headers or {})
    body = anthropic_api.error_body(status, message, headers.get("request-id", ""))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def past_token_quota(request: web.Request, tokens: int, headers: dict[str, str]) -> web.Response | None:
    """None when the token quota admits a request of `tokens` (its headers added to `headers`), else the 429."""
    admitted, shown = request.app[STATE].take_tokens(is_anthropic(request), tokens)
    headers.update(shown)
    return None if admitted else api_error(request, 429, "mock quota: token limit reached for now", headers)


def embedding_vector(text: str, dimensions: int) -> list[float]:
    digest = b""
    counter = 0
    while len(digest) < dimensions:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [round(byte / 127.5 - 1.0, 6) for byte in digest[:dimensions]]


@dataclass(slots=True)
class Quota:
    """`requests` per fixed window of `window_s` seconds, the window starting at its first request."""

    requests: int
    window_s: float
    started: float = 0.0
    used: int = 0

    def take(self, now: float) -> tuple[bool, int, float]:
        """(admitted, remaining, seconds until the window resets) for one more request."""
        if not self.started or now >= self.started + self.window_s:
            self.started, self.used = now, 0
        admitted = self.used < self.requests
        if admitted:
            self.used += 1
        return admitted, self.requests - self.used, self.started + self.window_s - now


@dataclass(slots=True)
class TokenQuota:
    """`tokens` per `window_s` seconds as a bucket: full at first, refilled at tokens/window_s a second."""

    tokens: int
    window_s: float
    level: float = 0.0
    at: float | None = None

    def take(self, amount: int, now: float) -> tuple[bool, int, float]:
        """(admitted, remaining, seconds until full, or until `amount` fits if refused) for `amount` tokens."""
        rate = self.tokens / self.window_s
        level = self.tokens if self.at is None else min(self.tokens, self.level + (now - self.at) * rate)
        admitted = amount <= level
        if admitted:
            level -= amount
        self.level, self.at = level, now
        wait_s = (self.tokens - level if admitted else amount - level) / rate
        return admitted, math.floor(level), wait_s


def limit_headers(anthropic: bool, kind: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    """What a provider shows of one limit (`kind` requests or tokens), in the API's own headers."""
    if anthropic:
        instant = datetime.fromtimestamp(time.time() + reset_s, UTC).isoformat().replace("+00:00", "Z")
        return {
            f"anthropic-ratelimit-{kind}-limit": str(limit),
            f"anthropic-ratelimit-{kind}-remaining": str(remaining),
            f"anthropic-ratelimit-{kind}-reset": instant,
        }
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(remaining),
        f"x-ratelimit-reset-{kind}": f"{max(1, math.ceil(reset_s * 1000))}ms",
    }


def retry_after_headers(anthropic: bool, wait_s: float) -> dict[str, str]:
    """A quota refusal's wait: `retry-after` in whole seconds (and OpenAI's `retry-after-ms`)."""
    millis = max(1, math.ceil(wait_s * 1000))
    headers = {"retry-after": str(math.ceil(millis / 1000))}
    if not anthropic:
        headers["retry-after-ms"] = str(millis)
    return headers


class MockState:
    """Everything the mock remembers, guarded by one lock so other threads may read and reset it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._quota: Quota | None = None
        self._token_quota: TokenQuota | None = None
        self._faults: deque[dict[str, Any]] = deque()
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_LOGGED_REQUESTS)
        self._ids = itertools.count(1)
        self._stats = self._zero_stats()
        self._responses: dict[str, dict[str, Any]] = {}  # Responses API: id -> {"response", "input_items"}

    @staticmethod
    def _zero_stats() -> dict[str, int]:
        return dict.fromkeys(
            (
                "requests",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
                "streams_started",
                "streams_completed",
                "streams_cancelled",
                "rate_limited",
            ),
            0,
        )

    def add_faults(self, faults: list[dict[str, Any]]) -> None:
        checked = [validate_fault(fault) for fault in faults]
        with self._lock:
            self._faults.extend(checked)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_quota(self, requests: int | None, window_s: float = 60.0, tokens: int | None = None) -> None:
        """N requests per window and T tokens per window_s (None: no such quota), starting afresh."""
        with self._lock:
            self._quota = None if requests is None else Quota(requests, window_s)
            self._token_quota = None if tokens is None else TokenQuota(tokens, window_s)

    def take_quota(self, anthropic: bool) -> tuple[bool, dict[str, str]]:
        """Whether the request quota admits one more request, and the headers that show it."""
        with self._lock:
            quota = self._quota
            if quota is None:
                return True, {}
            admitted, remaining, reset_s = quota.take(time.monotonic())
            headers = limit_headers(anthropic, "requests", quota.requests, remaining, reset_s)
            if not admitted:
                self._stats["rate_limited"] += 1
                headers |= retry_after_headers(anthropic, reset_s)
            return admitted, headers

    def take_tokens(self, anthropic: bool, tokens: int) -> tuple[bool, dict[str, str]]:
        """Whether the token quota admits a request using `tokens`, and the headers that show it."""
        with self._lock:
            quota = self._token_quota
            if quota is None:
                return True, {}
            admitted, remaining, wait_s = quota.take(tokens, time.monotonic())
            headers = limit_headers(anthropic, "tokens", quota.tokens, remaining, wait_s)
            if not admitted:
                self._stats["rate_limited"] += 1
                headers |= retry_after_headers(anthropic, wait_s)
            return admitted, headers

    def next_fault(self) -> dict[str, Any]:
        with self._lock:
            return self._faults.popleft() if self._faults else {}

    def log_request(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(entry)
            self._stats["requests"] += 1

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = self._zero_stats()

    def count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def reported(self, usage: dict[str, Any]) -> None:
        details = usage.get("prompt_tokens_details", {})
        self.tallied(
            Tally(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), details.get("cached_tokens", 0))
        )

    def tallied(self, tally: Tally) -> None:
        with self._lock:
            for name in (
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            ):
                self._stats[name] += getattr(tally, name)

    def store_response(self, response: dict[str, Any], items: list[dict[str, Any]], script: Script) -> None:
        with self._lock:
            self._responses[response["id"]] = {"response": response, "input_items": items, "script": script}
            if len(self._responses) > MAX_LOGGED_REQUESTS:  # the oldest go, as logged requests do
                del self._responses[next(iter(self._responses))]

    def stored_response(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._responses.get(response_id)

    def delete_response(self, response_id: str) -> bool:
        with self._lock:
            return self._responses.pop(response_id, None) is not None

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._requests.clear()
            self._stats = self._zero_stats()
            self._responses.clear()
            self._quota = None
            self._token_quota = None


STATE = web.AppKey("mock_state", MockState)
SETTINGS = web.AppKey("mock_settings", dict)


class Completion:
    """One generation request, its fault applied: the words to emit and the usage to report."""

    def __init__(self, kind: str, body: dict[str, Any], fault: dict[str, Any], settings: dict[str, Any], ident: int):
        self.chat = kind == "chat"
        self.fault = fault
        self.model = body.get("model", "")
        self.stream = bool(body.get("stream"))
        self.include_usage = self.stream and bool((body.get("stream_options") or {}).get("include_usage"))
        self.chunk_delay_s = float(fault.get("chunk_delay_s", settings["chunk_delay_s"]))
        self.n = max(1, int(body.get("n") or 1))
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-mock{ident:08d}"
        self.object = "chat.completion" if self.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())
        available = int(fault.get("chunks", settings["chunks"]))
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        count = available if cap is None else max(0, min(available, int(cap)))
        self.words = [f"word{i}" if i == 0 else f" word{i}" for i in range(count)]
        self.finish_reason = "length" if count < available else "stop"
        prompt_tokens = text_tokens(body.get("messages") if self.chat else body.get("prompt"))
        completion_tokens = round(count * self.n * float(fault.get("usage_multiplier", 1.0)))
        self.usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if self.chat:
            self.usage["prompt_tokens_details"] = {"cached_tokens": int(fault.get("cached_tokens", 0))}
            if "cache_write_tokens" in fault:  # as OpenAI-compatible gateways in front of Anthropic report it
                self.usage["prompt_tokens_details"]["cache_write_tokens"] = int(fault["cache_write_tokens"])
            reasoning = min(int(fault.get("reasoning_tokens", 0)), completion_tokens)
            self.usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        self.report_usage = not fault.get("no_usage")

    def _base(self, object_name: str) -> dict[str, Any]:
        base = {"id": self.id, "object": object_name, "created": self.created, "model": self.model}
        if self.chat:
            base["system_fingerprint"] = "fp_mock"
        return base

    def body(self) -> dict[str, Any]:
        text = "".join(self.words)
        choices = []
        for index in range(self.n):
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choice.update(logprobs=None, finish_reason=self.finish_reason)
            choices.append(choice)
        body = self._base(self.object) | {"choices": choices}
        if self.report_usage:
            body["usage"] = self.usage
        return body

    def chunk(self, index: int, word: str | None, finish_reason: str | None = None, first: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if word is not None:
                delta["content"] = word
            choice["delta"] = delta
        else:
            choice["text"] = word or ""
        choice.update(logprobs=None, finish_reason=finish_reason)
        chunk = self._base(self.chunk_object) | {"choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def usage_chunk(self) -> bytes:
        return sse(self._base(self.chunk_object) | {"choices": [], "usage": self.usage})


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def retry_headers(fault: dict[str, Any]) -> dict[str, str]:
    headers = {}
    if "retry_after" in fault:
        headers["Retry-After"] = fault["retry_after"]
    if "retry_after_ms" in fault:
        headers["retry-after-ms"] = fault["retry_after_ms"]
    return headers


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _transport(request: web.Request) -> asyncio.Transport:
    transport = request.transport
    assert transport is not None  # the handler runs while its connection is open
    return transport


async def send_partial(request: web.Request, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Promise the whole body, send half of it, then close the connection."""
    response = web.StreamResponse(headers=headers | {"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    _transport(request).close()
    return response


async def stream_completion(
    request: web.Request, state: MockState, completion: Completion, headers: dict[str, str]
) -> web.StreamResponse:
    fault = completion.fault
    cut_after = fault.get("cut_after_chunks")
    bad_line_at = len(completion.words) // 2 if fault.get("bad_sse_line") else None
    response = web.StreamResponse(headers=headers | {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    state.count("streams_started")
    try:
        await response.prepare(request)
        if cut_after is not None and fault.get("cut_in_one_write"):
            sent = completion.words[:cut_after]
            await response.write(
                b"".join(
                    completion.chunk(index, word, first=position == 0)
                    for position, word in enumerate(sent)
                    for index in range(completion.n)
                )
            )
            _transport(request).close()
            return response
        for position, word in enumerate(completion.words):
            if position == bad_line_at:
                await response.write(b"data: not-json\n\n")
            if position == cut_after:
                _transport(request).close()
                return response
            if position and completion.chunk_delay_s:
                await asyncio.sleep(completion.chunk_delay_s)
            for index in range(completion.n):
                await response.write(completion.chunk(index, word, first=position == 0))
        if cut_after is not None:  # asked to cut after every word: still never finish
            _transport(request).close()
            return response
        if completion.chunk_delay_s and completion.words:
            await asyncio.sleep(completion.chunk_delay_s)
        for index in range(completion.n):
            last = completion.chunk(index, None, completion.finish_reason, first=not completion.words)
            await response.write(last)
        if completion.include_usage and completion.report_usage:
            await response.write(completion.usage_chunk())
            state.reported(completion.usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        state.count("streams_cancelled")
        raise
    state.count("streams_completed")
    return response


async def stream_script(
    request: web.Request,
    state: MockState,
    script: Script,
    fault: dict[str, Any],
    headers: dict[str, str],
    delay_s: float,
) -> web.StreamResponse:
    """Send a Responses or Anthropic stream: head, a delta per word (the faults count these), tail."""
    cut_after = fault.get("cut_after_chunks")
    error_after = fault.get("error_after_chunks")
    bad_line_at = len(script.deltas) // 2 if fault.get("bad_sse_line") else None
    response = web.StreamResponse(headers=headers | {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    state.count("streams_started")
    try:
        await response.prepare(request)
        if cut_after is not None and fault.get("cut_in_one_write"):
            await response.write(b"".join(script.head + script.deltas[:cut_after]))
            _transport(request).close()
            return response
        for frame in script.head:
            await response.write(frame)
        for position, frame in enumerate(script.deltas):
            if position == bad_line_at:
                await response.write(b"data: not-json\n\n")
            if position == cut_after:
                _transport(request).close()
                return response
            if position == error_after:
                await response.write(script.error_frame(position))
                await response.write_eof()
                return response
            if position and delay_s:
                await asyncio.sleep(delay_s)
            await response.write(frame)
        if cut_after is not None:  # asked to cut after every delta: still never finish
            _transport(request).close()
            return response
        if error_after is not None:
            await response.write(script.error_frame(len(script.deltas)))
            await response.write_eof()
            return response
        if delay_s and script.deltas:
            await asyncio.sleep(delay_s)
        for frame in script.tail:
            await response.write(frame)
        if script.tally is not None:
            state.tallied(script.tally)
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        state.count("streams_cancelled")
        raise
    state.count("streams_completed")
    return response


async def send_script_or_body(
    request: web.Request,
    stream: bool,
    script: Script,
    body: dict[str, Any],
    tally: Tally | None,
    fault: dict[str, Any],
    headers: dict[str, str],
) -> web.StreamResponse:
    state = request.app[STATE]
    if stream:
        delay_s = float(fault["chunk_delay_s"] if "chunk_delay_s" in fault else request.app[SETTINGS]["chunk_delay_s"])
        try:
            return await stream_script(request, state, script, fault, headers, delay_s)
        except ConnectionError:  # the client went away; nothing more can be sent
            return web.Response()
    payload = orjson.dumps(body)
    if "cut_after_chunks" in fault:
        return await send_partial(request, payload, headers)
    if tally is not None:
        state.tallied(tally)
    return web.Response(body=payload, content_type="application/json", headers=headers)


async def create_response(
    request: web.Request, body: dict[str, Any], fault: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    state = request.app[STATE]
    previous = body.get("previous_response_id")
    if previous is not None and state.stored_response(str(previous)) is None:
        payload = {
            "error": {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }
        }
        return web.Response(status=400, body=orjson.dumps(payload), content_type="application/json", headers=headers)
    ident = state.next_id()
    try:
        call = responses_api.ResponseCall(body, fault, request.app[SETTINGS]["chunks"], ident)
    except (TypeError, ValueError) as exc:
        return error_response(400, f"invalid request parameter: {exc}", headers)
    refused = past_token_quota(request, call.output.input_tokens + call.output.output_tokens, headers)
    if refused is not None:
        return refused
    final = call.response()
    if final["store"]:
        state.store_response(final, responses_api.input_items(body, ident), call.script())
    return await send_script_or_body(
        request, body.get("stream") is True, call.script(), final, call.tally(), fault, headers
    )


async def stored_response_route(
    request: web.Request, fault: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    """GET|DELETE /v1/responses/{id} (GET ?stream=true[&starting_after=N]: its events again),
    POST /v1/responses/{id}/cancel, GET .../input_items."""
    state = request.app[STATE]
    parts = request.path.removeprefix("/v1/responses/").split("/")
    response_id, action = parts[0], "/".join(parts[1:])
    stored = state.stored_response(response_id)
    known = (request.method, action) in {("GET", ""), ("DELETE", ""), ("POST", "cancel"), ("GET", "input_items")}
    if not known:
        return error_response(404, f"Unknown request URL: {request.method} {request.path}", headers)
    if stored is None:
        return error_response(404, f"Response with id '{response_id}' not found.", headers)
    if request.method == "GET" and not action and request.query.get("stream") == "true":
        after = request.query.get("starting_after")
        if after is not None and not (after.isascii() and after.isdigit() and len(after) <= 18):
            message = f"Invalid 'starting_after': expected a non-negative integer, but got '{after}' instead."
            return error_response(400, message, headers)
        script = responses_api.replay(stored["script"], None if after is None else int(after))
        return await send_script_or_body(request, True, script, stored["response"], None, fault, headers)
    if request.method == "DELETE":
        state.delete_response(response_id)
        reply: Any = {"id": response_id, "object": "response.deleted", "deleted": True}
    elif action == "input_items":
        items = stored["input_items"]
        if request.query.get("order", "desc") == "desc":
            items = items[::-1]
        limit = int(request.query["limit"]) if request.query.get("limit", "").isdigit() else 20
        shown = items[:limit]
        reply = {
            "object": "list",
            "data": shown,
            "first_id": shown[0]["id"] if shown else None,
            "last_id": shown[-1]["id"] if shown else None,
            "has_more": len(items) > limit,
        }
    else:  # a finished response is returned as it is, also by cancel (cancelling it changes nothing)
        reply = stored["response"]
    return web.Response(body=orjson.dumps(reply), content_type="application/json", headers=headers)


async def anthropic_route(
    request: web.Request, body: Any, fault: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    if "x-api-key" not in request.headers and "authorization" not in request.headers:
        return api_error(request, 401, "x-api-key header is required", headers)
    if ANTHROPIC_VERSION_HEADER not in request.headers:
        return api_error(request, 400, "anthropic-version: header is required", headers)
    if request.method != "POST" or request.path not in (ANTHROPIC_PREFIX, ANTHROPIC_PREFIX + "/count_tokens"):
        return api_error(request, 404, f"Unknown request URL: {request.method} {request.path}", headers)
    if not isinstance(body, dict):
        return api_error(request, 400, "The request body is not valid JSON.", headers)
    counting = request.path.endswith("/count_tokens")
    missing = anthropic_api.missing_field({"max_tokens": 0, **body} if counting else body)
    if missing is not None:
        return api_error(request, 400, f"{missing}: Field required", headers)
    if counting:
        payload = {"input_tokens": anthropic_api.prompt_tokens(body)}
        return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)
    state = request.app[STATE]
    try:
        call = anthropic_api.MessageCall(body, fault, request.app[SETTINGS]["chunks"], state.next_id())
    except ValueError as exc:
        return api_error(request, 400, str(exc), headers)
    refused = past_token_quota(request, call.output.input_tokens + call.output.output_tokens, headers)
    if refused is not None:
        return refused
    return await send_script_or_body(
        request, body.get("stream") is True, call.script(), call.message(), call.tally(), fault, headers
    )


async def generate(
    request: web.Request, kind: str, body: dict[str, Any], fault: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        completion = Completion(kind, body, fault, request.app[SETTINGS], state.next_id())
    except (TypeError, ValueError) as exc:
        return error_response(400, f"invalid request parameter: {exc}", headers)
    refused = past_token_quota(request, completion.usage["total_tokens"], headers)
    if refused is not None:
        return refused
    if completion.stream:
        try:
            return await stream_completion(request, state, completion, headers)
        except ConnectionError:  # the client went away; nothing more can be sent
            return web.Response()
    payload = orjson.dumps(completion.body())
    if "cut_after_chunks" in fault:
        return await send_partial(request, payload, headers)
    if completion.report_usage:
        state.reported(completion.usage)
    return web.Response(body=payload, content_type="application/json", headers=headers)


def embeddings(
    request: web.Request, body: dict[str, Any], fault: dict[str, Any], headers: dict[str, str]
) -> web.Response:
    inputs = body.get("input", "")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    dimensions = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(str(item), dimensions)
        encoded: Any = vector
        if as_base64:
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = text_tokens(inputs)
    refused = past_token_quota(request, tokens, headers)
    if refused is not None:
        return refused
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    payload = {"object": "list", "data": data, "model": body.get("model", "")}
    if not fault.get("no_usage"):
        payload["usage"] = usage
        request.app[STATE].reported(usage)
    return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)


def model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "mock"}


async def handle_v1(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    state.log_request(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": {name.lower(): value for name, value in request.headers.items()},
            "body": body,
            "time": time.time(),
        }
    )
    headers = {"request-id": f"req_mock{state.next_id():08d}"} if is_anthropic(request) else {}
    admitted, shown = state.take_quota(is_anthropic(request))
    headers |= shown
    if not admitted:
        return api_error(request, 429, "mock quota: request limit reached for this window", headers)
    if FAULT_HEADER in request.headers:
        try:
            fault = validate_fault(orjson.loads(request.headers[FAULT_HEADER]))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return api_error(request, 400, f"bad {FAULT_HEADER} header: {exc}", headers)
    else:
        fault = state.next_fault()
    if fault.get("close_connection"):
        _transport(request).abort()
        return web.Response()
    if fault.get("first_byte_delay_s"):
        await asyncio.sleep(fault["first_byte_delay_s"])
    headers |= retry_headers(fault) | fault.get("headers", {})
    if "status" in fault:
        return api_error(request, fault["status"], f"mock fault: status {fault['status']}", headers)
    if fault.get("malformed_json"):
        return web.Response(
            body=b'{"id": "chatcmpl-mock", "choices": [', content_type="application/json", headers=headers
        )
    return await route(request, body, fault, headers)


async def route(request: web.Request, body: Any, fault: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
    path, method = request.path, request.method
    if is_anthropic(request):
        return await anthropic_route(request, body, fault, headers)
    if method == "POST" and path == "/v1/responses":
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", headers)
        return await create_response(request, body, fault, headers)
    if path.startswith("/v1/responses/"):
        return await stored_response_route(request, fault, headers)
    if method == "POST" and path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", headers)
        if path == "/v1/embeddings":
            return embeddings(request, body, fault, headers)
        kind = "chat" if path == "/v1/chat/completions" else "completion"
        return await generate(request, kind, body, fault, headers)
    if method == "GET" and path == "/v1/models":
        payload = {"object": "list", "data": [model_object(model) for model in MODELS]}
        return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)
    if method == "GET" and path.startswith("/v1/models/"):
        payload = model_object(path.removeprefix("/v1/models/"))
        return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)
    return error_response(404, f"Unknown request URL: {method} {path}", headers)


def json_response(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


async def get_requests(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].requests)


async def delete_requests(request: web.Request) -> web.Response:
    request.app[STATE].clear_requests()
    return json_response({"ok": True})


async def get_stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].stats())


async def delete_stats(request: web.Request) -> web.Response:
    request.app[STATE].reset_stats()
    return json_response({"ok": True})


async def post_faults(request: web.Request) -> web.Response:
    faults = await read_json(request)
    if not isinstance(faults, list):
        return error_response(400, "POST /_mock/faults takes a JSON list of fault objects")
    try:
        request.app[STATE].add_faults(faults)
    except ValueError as exc:
        return error_response(400, str(exc))
    return json_response({"ok": True, "queued": len(faults)})


async def delete_faults(request: web.Request) -> web.Response:
    request.app[STATE].clear_faults()
    return json_response({"ok": True})


async def post_quota(request: web.Request) -> web.Response:
    quota = await read_json(request)
    fields = quota if isinstance(quota, dict) else {}
    requests, tokens, window_s = fields.get("requests"), fields.get("tokens"), fields.get("window_s", 60)

    def count(value: Any) -> bool:
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)

    valid = isinstance(window_s, int | float) and not isinstance(window_s, bool) and window_s > 0
    if not (count(requests) and count(tokens) and valid) or (requests is None and tokens is None):
        return error_response(
            400, 'POST /_mock/quota takes {"requests": N >= 0, "tokens": T >= 0 (either or both), "window_s": S > 0}'
        )
    request.app[STATE].set_quota(requests, float(window_s), tokens)
    return json_response({"ok": True})


async def delete_quota(request: web.Request) -> web.Response:
    request.app[STATE].set_quota(None)
    return json_response({"ok": True})


def create_mock_app(
    *,
    chunk_delay_s: float = 0.0,
    chunks: int = DEFAULT_CHUNKS,
    quota: tuple[int | None, float, int | None] | None = None,
) -> web.Application:
    """The mock app; `quota` is (requests, window_s, tokens), as `MockState.set_quota` takes them."""
    app = web.Application()
    app[STATE] = MockState()
    if quota is not None:
        app[STATE].set_quota(*quota)
    app[SETTINGS] = {"chunk_delay_s": chunk_delay_s, "chunks": chunks}
    app.router.add_get("/_mock/requests", get_requests)
    app.router.add_delete("/_mock/requests", delete_requests)
    app.router.add_get("/_mock/stats", get_stats)
    app.router.add_delete("/_mock/stats", delete_stats)
    app.router.add_post("/_mock/faults", post_faults)
    app.router.add_delete("/_mock/faults", delete_faults)
    app.router.add_post("/_mock/quota", post_quota)
    app.router.add_delete("/_mock/quota", delete_quota)
    app.router.add_route("*", "/v1/{tail:.*}", handle_v1)
    return app


class MockUpstream:
    """The mock app served on `host` (127.0.0.1) from a background thread with its own event loop."""

    def __init__(
        self, port: int = 0, chunk_delay_s: float = 0.0, chunks: int = DEFAULT_CHUNKS, host: str = "127.0.0.1"
    ):
        self.host = host
        self.port = port
        self.app = create_mock_app(chunk_delay_s=chunk_delay_s, chunks=chunks)
        self._state = self.app[STATE]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> MockUpstream:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="mock-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        try:
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_faults(self, faults: list[dict[str, Any]]) -> None:
        self._state.add_faults(faults)

    def set_quota(self, requests: int | None, window_s: float = 60.0, tokens: int | None = None) -> None:
        """A quota of its own: `requests` per fixed window of `window_s` seconds, `tokens` per
        `window_s` as a continuously refilled bucket (None: no such quota)."""
        self._state.set_quota(requests, window_s, tokens)

    def clear(self) -> None:
        """Forget queued faults, logged requests, stats and the quota."""
        self._state.clear()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._state.requests

    def stats(self) -> dict[str, int]:
        return self._state.stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.mock_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="words per reply")
    parser.add_argument("--quota-requests", type=int, default=None, help="requests per window; past it, 429")
    parser.add_argument("--quota-tokens", type=int, default=None, help="tokens per window (a bucket); past it, 429")
    parser.add_argument("--quota-window-s", type=float, default=60.0, help="the quota's window in seconds")
    args = parser.parse_args(argv)
    quota = None
    if args.quota_requests is not None or args.quota_tokens is not None:
        quota = (args.quota_requests, args.quota_window_s, args.quota_tokens)
    app = create_mock_app(chunk_delay_s=args.chunk_delay, chunks=args.chunks, quota=quota)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        print=lambda _: print(f"mock upstream on http://{args.host}:{args.port}/v1", flush=True),
    )


if __name__ == "__main__":
    main()
