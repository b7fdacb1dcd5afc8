"""The relay stage for the agent APIs: a Responses or Messages stream, as it comes, unchanged.

Events (their `event:` lines, Anthropic's `ping`s) pass through as they came, all the events one
upstream read completed in one write, never part of an event; a meter from `proxy.apis` reads the
usage from those blocks: the final event's, or, for a stream cut before it, what was produced.
A stream that breaks, times out or hits a bug ends with the API's own `error` event (unless the
upstream already ended it with one).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Protocol

from ..apis.anthropic import MessagesStreamMeter
from ..apis.anthropic import error_event as anthropic_error_event
from ..apis.responses import ResponsesStreamMeter, error_event_after, event_name
from ..errors import UpstreamBroken, UpstreamReadTimeout
from ..http.responses import Settle, SSEResponse
from ..limits.types import Usage
from ..observe import Outcome
from ..upstream import sse
from ..upstream.client import UpstreamResponse
from .call import Call
from .relay import SSE_HEADERS, StreamUsage

log = logging.getLogger("proxy.gateway")

STREAM_CUT = "The upstream stream was interrupted before it finished."
STREAM_TIMEOUT = "The upstream stopped sending before the stream finished."
INTERNAL_ERROR = "The proxy had an internal error."
_RESPONSE_ID = re.compile(rb'"id": ?"(resp_[^"\\]{1,200})"')


Created = Callable[[str], Awaitable[None]]  # told a stored response's id before the client sees it


class Meter(Protocol):
    def feed(self, block: bytes) -> None: ...  # one or more complete events

    @property
    def finished(self) -> bool: ...

    def usage(self) -> Usage: ...


def agent_stream_response(
    response: UpstreamResponse,
    call: Call,
    outcome: Outcome,
    reply_headers: Mapping[str, str],
    produced: StreamUsage,
    settle: Settle,
    on_created: Created | None = None,
) -> SSEResponse:
    headers = list(SSE_HEADERS)
    headers.append((b"x-request-id", outcome.request_id.encode("latin-1")))
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in reply_headers.items())
    events = relay_events(response, call, outcome, produced, on_created)
    return SSEResponse(events, 200, headers, settle=settle)


def _ends_with_error(block: bytes) -> bool:
    return bool(block) and event_name(sse.events_in(block)[-1]) == b"error"


def _error_event(call: Call, meter: Meter, message: str, timed_out: bool = False) -> bytes:
    if isinstance(meter, ResponsesStreamMeter):
        return meter.error_event(message, "upstream_timeout" if timed_out else "upstream_error")
    return anthropic_error_event("timeout_error" if timed_out else "api_error", message)


async def relay_events(
    response: UpstreamResponse, call: Call, outcome: Outcome, produced: StreamUsage, on_created: Created | None = None
) -> AsyncGenerator[bytes, None]:
    """The upstream's events as they arrive, all those one read completed in one write (never
    part of an event); `produced` gets the usage once the stream ends."""
    meter: Meter = (
        ResponsesStreamMeter(call.prompt_tokens)
        if call.endpoint == "responses"
        else MessagesStreamMeter(call.prompt_tokens)
    )
    splitter = sse.EventSplitter()
    completed = False
    outcome.status = 200
    block = last = b""  # the block being relayed; the last one relayed
    want_id = on_created is not None
    try:
        async for chunk in response.iter_chunks():
            block = splitter.feed_block(chunk)
            if not block:
                continue
            meter.feed(block)
            if want_id:  # response.created comes first and names the response
                want_id = False
                found = _RESPONSE_ID.search(block)
                produced.response_id = found.group(1).decode() if found else None
                if produced.response_id is not None and on_created is not None:
                    await on_created(produced.response_id)
            if outcome.first_byte_at == 0.0:
                outcome.first_byte_at = time.monotonic()
            last, block = block, b""
            yield last
        if not meter.finished:
            raise UpstreamBroken("the stream ended before its final event")
        completed = True
    except (UpstreamBroken, UpstreamReadTimeout) as exc:
        timed_out = isinstance(exc, UpstreamReadTimeout)
        outcome.attempts.errors.append((outcome.attempts.upstream, "timeout" if timed_out else "stream_cut"))
        outcome.stream_error = "timeout" if timed_out else "stream_cut"
        if not _ends_with_error(last):  # the upstream's own `error` event already ended it
            yield _error_event(call, meter, STREAM_TIMEOUT if timed_out else STREAM_CUT, timed_out)
    except Exception:  # a bug: logged once, told to the client, settled like a cut stream
        log.exception("unexpected error relaying the stream of request %s", outcome.request_id)
        outcome.stream_error = "internal_error"
        if block:  # the events not relayed yet (metered, or being metered, when it failed)
            yield block
        yield _error_event(call, meter, INTERNAL_ERROR)
    finally:
        if completed:
            response.release()
        else:
            response.close()  # cancels the upstream request
        outcome.upstream_finished_at = time.monotonic()
        if not completed and outcome.stream_error is None:
            outcome.client_gone = True
        produced.usage = meter.usage()


def replay_response(
    response: UpstreamResponse, outcome: Outcome, reply_headers: Mapping[str, str], first: int, settle: Settle
) -> SSEResponse:
    """GET /v1/responses/{id}?stream=true: a stored response's events as the upstream streams them."""
    headers = list(SSE_HEADERS)
    headers.append((b"x-request-id", outcome.request_id.encode("latin-1")))
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in reply_headers.items())
    return SSEResponse(replay_events(response, outcome, first), 200, headers, settle=settle)


async def replay_events(response: UpstreamResponse, outcome: Outcome, first: int) -> AsyncGenerator[bytes, None]:
    """The events of a stored response as they arrive, unchanged, all those one read completed in
    one write. Nothing is metered (the request that created the response was charged); a stream
    the upstream breaks ends with an `error` event numbered after the last one relayed (`first`
    when none was)."""
    splitter = sse.EventSplitter()
    completed = False
    outcome.status = 200
    last = b""
    try:
        async for chunk in response.iter_chunks():
            if block := splitter.feed_block(chunk):
                if outcome.first_byte_at == 0.0:
                    outcome.first_byte_at = time.monotonic()
                last = block
                yield block
        completed = True  # the upstream ended the response: a replay may end before a final event
    except (UpstreamBroken, UpstreamReadTimeout) as exc:
        timed_out = isinstance(exc, UpstreamReadTimeout)
        outcome.attempts.errors.append((outcome.attempts.upstream, "timeout" if timed_out else "stream_cut"))
        outcome.stream_error = "timeout" if timed_out else "stream_cut"
        if not _ends_with_error(last):
            message, code = (STREAM_TIMEOUT, "upstream_timeout") if timed_out else (STREAM_CUT, "upstream_error")
            yield error_event_after(last, message, code, first)
    except Exception:  # a bug: logged once, told to the client
        log.exception("unexpected error relaying the stream of request %s", outcome.request_id)
        outcome.stream_error = "internal_error"
        yield error_event_after(last, INTERNAL_ERROR, first=first)
    finally:
        if completed:
            response.release()
        else:
            response.close()
        outcome.upstream_finished_at = time.monotonic()
        if not completed and outcome.stream_error is None:
            outcome.client_gone = True
