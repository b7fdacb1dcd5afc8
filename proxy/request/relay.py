"""The relay stage: the upstream's answer to the client, a stream event by event or a body whole.

A stream is relayed as its events arrive: all the events one upstream read completed in one write,
never part of an event. The usage chunk the proxy asked for is dropped when the client did not
ask for it (`sse.ChatStreamMeter`); a stream that breaks, times out or hits a bug ends with an
OpenAI-shaped error event. When it ends, for whatever reason, `StreamUsage` holds what it
produced (reported, or estimated from the relayed text) for the response to settle after its
last byte.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Mapping

from ..errors import UpstreamBroken, UpstreamReadTimeout
from ..http.responses import Settle, SettlingResponse, SSEResponse
from ..limits.types import Usage
from ..observe import Outcome
from ..upstream import sse
from ..upstream.client import UpstreamResponse
from .call import Call

log = logging.getLogger("proxy.gateway")

PASS_RESPONSE_HEADERS = ("openai-processing-ms", "openai-version", "openai-model")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
STREAM_CUT = {
    "error": {
        "message": "The upstream stream was interrupted before it finished.",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
}
INTERNAL_ERROR = {
    "error": {"message": "The proxy had an internal error.", "type": "server_error", "param": None, "code": None}
}


class StreamUsage:
    """What a relayed stream produced, filled in when it ends."""

    __slots__ = ("response_id", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self.response_id: str | None = None  # a Responses stream's, from response.created


def stream_response(
    response: UpstreamResponse,
    call: Call,
    outcome: Outcome,
    rate_headers: Mapping[str, str],
    produced: StreamUsage,
    settle: Settle,
) -> SSEResponse:
    headers = list(SSE_HEADERS)
    headers.append((b"x-request-id", outcome.request_id.encode("latin-1")))
    headers.extend((k.encode(), v.encode()) for k, v in rate_headers.items())
    return SSEResponse(relay_stream(response, call, outcome, produced), 200, headers, settle=settle)


def passthrough(
    response: UpstreamResponse, payload: bytes, request_id: str, rate_headers: Mapping[str, str], settle: Settle
) -> SettlingResponse:
    """A buffered answer as the upstream sent it, with the few upstream headers worth passing on."""
    headers = {
        name: value
        for name in PASS_RESPONSE_HEADERS
        if (value := response.headers.get(name)) is not None and _header_safe(value)
    }
    headers["x-request-id"] = request_id
    headers.update(rate_headers)
    media_type = response.headers.get("content-type", "application/json")
    if not _header_safe(media_type):
        media_type = "application/json"
    return SettlingResponse(payload, status_code=response.status, headers=headers, media_type=media_type, settle=settle)


def _header_safe(value: str) -> bool:
    """A value we can send on: printable latin-1 (aiohttp hands odd bytes over surrogate-escaped)."""
    if not value.isprintable():
        return False
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


async def relay_stream(
    response: UpstreamResponse, call: Call, outcome: Outcome, produced: StreamUsage
) -> AsyncGenerator[bytes, None]:
    """The upstream's events as they arrive, all those one read completed in one write; `produced`
    gets the usage once the stream ends (reported, or estimated when cut short)."""
    splitter = sse.EventSplitter()
    meter = sse.ChatStreamMeter(call.prompt_tokens, keep_usage=call.client_wants_usage)
    completed = False
    outcome.status = 200
    try:
        async for chunk in response.iter_chunks():
            block = splitter.feed_block(chunk)
            if block and (block := meter.feed(block)):
                completed = meter.done  # [DONE] relayed: a client leaving now left a finished stream
                if outcome.first_byte_at == 0.0:
                    outcome.first_byte_at = time.monotonic()
                yield block
        if not completed:
            raise UpstreamBroken("the stream ended without [DONE]")
    except (UpstreamBroken, UpstreamReadTimeout) as exc:
        kind = "timeout" if isinstance(exc, UpstreamReadTimeout) else "stream_cut"
        outcome.attempts.errors.append((outcome.attempts.upstream, kind))
        outcome.stream_error = kind
        yield sse.error_event(STREAM_CUT)
    except Exception:  # a bug: logged once, told to the client, settled like a cut stream
        log.exception("unexpected error relaying the stream of request %s", outcome.request_id)
        outcome.stream_error = "internal_error"
        yield sse.error_event(INTERNAL_ERROR)
    finally:
        if completed:
            response.release()
        else:
            response.close()  # cancels the upstream request
        outcome.upstream_finished_at = time.monotonic()
        if not completed and outcome.stream_error is None:
            outcome.client_gone = True
        produced.usage = meter.usage()
