"""One OpenAI call through the proxy: authenticate, read, admit, forward, relay, settle.

Settlement always happens exactly once per admitted request, in a `finally` shielded from
cancellation: after a full response, a failed upstream, a stream the client abandoned, a
stream the upstream cut, or a bug (which is also logged with its traceback and counted).
A request runs on the one `Snapshot` (config, keyring, upstream clients) it started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
import itertools
import os
from collections.abc import AsyncIterator, Awaitable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .auth import Caller, KeyRing, presented_key
from .budgets import BudgetWatch
from .config import Config, Model
from .errors import ClientClosedRequest, ModelNotAllowed, ModelNotFound, ProxyError, UpstreamError, UpstreamTimeout
from .forwarding import sse
from .forwarding.context import apply_context_policy
from .forwarding.hop_by_hop import forwarded_headers
from .forwarding.relay import Attempts, open_upstream
from .forwarding.upstream import UpstreamBroken, UpstreamClient, UpstreamReadTimeout, UpstreamResponse
from .http.body import parse_json_object, read_body
from .http.calls import Call, parse_call
from .http.sse_response import SettlingResponse, SSEResponse
from .limits.limiter import Limiter, Ticket, reserved_tokens
from .limits.types import Usage
from .observe import Observer, Outcome
from .pricing import cost_micros, reservation_micros
from .snapshot import Snapshot
from .tags import parse_tags
from .tokens import estimate_text_tokens

log = logging.getLogger("proxy.gateway")

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
DROP_REQUEST_HEADERS = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "authorization", "api-key", "accept-encoding", "cookie",
    "x-proxy-tags", "openai-organization", "openai-project", "x-forwarded-for", "x-real-ip",
})
PASS_RESPONSE_HEADERS = ("openai-processing-ms", "openai-version", "openai-model")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
DEFAULT_DEADLINE_S = 600.0


_ID_PREFIX = "req_" + os.urandom(8).hex()  # unique per process; the counter makes it unique per request
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def request_id_of(request: Request) -> str:
    """The id echoed to the client, logged and sent upstream: the client's own when it gave one.
    Never a store key: a client could reuse it (see `new_request_id` for the limiter's)."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable():
        return given
    return new_request_id()


def _header_safe(value: str) -> bool:
    """A value we can send on: printable latin-1 (aiohttp hands odd bytes over surrogate-escaped)."""
    return value.isprintable() and all(ord(c) < 256 for c in value)


async def _client_leaves(receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _leaving(snapshot: Snapshot, settling: Awaitable[None]) -> None:
    """Settle, then let go of the snapshot the request ran on."""
    try:
        await settling
    finally:
        snapshot.leave()


class StreamUsage:
    """What a relayed stream produced, filled in when it ends."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage = Usage()


class Gateway:
    def __init__(self, config: Config, keyring: KeyRing, upstreams: dict[str, UpstreamClient], limiter: Limiter,
                 observer: Observer, budgets: BudgetWatch):
        self.budgets = budgets
        self.snapshot = Snapshot(config, keyring, upstreams)
        self.limiter = limiter
        self.observer = observer

    # the running setup, for the admin and ops API; a request reads its own snapshot instead
    @property
    def config(self) -> Config:
        return self.snapshot.config

    @property
    def keyring(self) -> KeyRing:
        return self.snapshot.keyring

    @property
    def upstreams(self) -> dict[str, UpstreamClient]:
        return self.snapshot.upstreams

    def apply(self, snapshot: Snapshot) -> Snapshot:
        """Swap in a reloaded setup for the next request; returns the replaced one, which the
        requests already running keep until they finish."""
        replaced, self.snapshot = self.snapshot, snapshot
        self.limiter.reconfigure(snapshot.config)
        return replaced

    # -- entry points -------------------------------------------------------------------------
    async def handle(self, request: Request, endpoint: str) -> Response | SSEResponse:
        snapshot = self.snapshot
        snapshot.enter()
        outcome = Outcome(request_id=request_id_of(request), endpoint=endpoint, started=time.monotonic())
        handed_over = False
        try:
            caller = outcome.caller = snapshot.keyring.authenticate(presented_key(request.headers))
            call = await self._read_call(request, endpoint, caller, snapshot.config)
            outcome.model, outcome.stream = call.model, call.stream
            if snapshot.config.log_bodies:
                outcome.request_body = call.body
            reply = await self._forward(request, call, caller, outcome, snapshot)
            handed_over = True  # the reply leaves the snapshot once it has settled
            return reply
        except ProxyError as error:
            return self._failed(outcome, error)
        except Exception:
            # a bug; if it came after admission, `_forward` has settled the request already
            log.exception("unexpected error in request %s to %s", outcome.request_id, endpoint)
            return self._failed(outcome, ProxyError("The proxy had an internal error."))
        finally:
            if not handed_over:
                snapshot.leave()

    def authenticate(self, request: Request) -> Caller:
        return self.keyring.authenticate(presented_key(request.headers))

    def _failed(self, outcome: Outcome, error: ProxyError) -> Response:
        outcome.fail(error)
        self.observer.finished(outcome)
        return self.error_response(error, outcome.request_id, outcome.ticket)

    # -- steps --------------------------------------------------------------------------------
    async def _read_call(self, request: Request, endpoint: str, caller: Caller, config: Config) -> Call:
        raw = await read_body(request, config.max_body_bytes)
        body = parse_json_object(raw)
        name = body.get("model")
        model = config.models.get(name) if isinstance(name, str) else None
        call = parse_call(endpoint, body, model.default_max_tokens if model else None)
        if model is None:
            raise ModelNotFound(f"The model `{call.model}` does not exist or you do not have access to it.",
                                param="model")
        if not caller.may_use(call.model):
            raise ModelNotAllowed(f"This key is not allowed to use the model `{call.model}`.", param="model")
        call.prompt_tokens = apply_context_policy(call.model, model, endpoint, body, call.prompt_tokens,
                                                  call.max_output)
        return call

    async def _forward(self, request: Request, call: Call, caller: Caller, outcome: Outcome,
                       snapshot: Snapshot) -> Response | SSEResponse:
        model = snapshot.config.models[call.model]
        price = call.price = model.price_per_mtok
        tags = parse_tags(request.headers.get("x-proxy-tags"), call.body)
        outcome.tags = tags
        ticket = await self.limiter.admit(
            new_request_id(), caller, reserved_tokens(call.prompt_tokens, call.max_output),
            reservation_micros(price, call.prompt_tokens, call.max_output),
        )
        outcome.ticket = ticket
        self.observer.admitted(outcome)
        body = call.body
        if call.stream:
            options = body.get("stream_options") or {}
            body = {**body, "stream_options": {**options, "include_usage": True}}
        headers = forwarded_headers(request.headers.items(), DROP_REQUEST_HEADERS)
        headers["x-request-id"] = outcome.request_id
        attempts = outcome.attempts
        settle_failed = True
        # the body is read: from now on the client can only say that it left; if it does before
        # the response starts, stop waiting on (or retrying) the upstream at once
        watcher = asyncio.ensure_future(_client_leaves(request.receive))
        fetch = asyncio.ensure_future(self._fetch(call, model, body, headers, self._deadline(request), attempts,
                                                  snapshot.upstreams))
        try:
            await asyncio.wait((fetch, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                outcome.client_gone = True
                raise ClientClosedRequest("The client closed the connection before the response started.")
            response, payload = fetch.result()
            outcome.upstream_headers_at = time.monotonic()
            if payload is None:  # a stream
                produced = StreamUsage()
                reply: Response | SSEResponse = SSEResponse(
                    self._relay_stream(response, call, outcome, produced), 200,
                    self._stream_headers(outcome.request_id, ticket),
                    settle=lambda: _leaving(snapshot, self._settle(ticket, call, produced.usage, outcome)))
                settle_failed = False
                return reply
            outcome.finished_upstream = time.monotonic()
            usage = self._usage_of(response.status, payload, call)
            outcome.status = response.status
            if snapshot.config.log_bodies:
                outcome.response_body = payload
            reply = self._passthrough(response, payload, outcome.request_id, ticket,
                                      settle=lambda: _leaving(snapshot, self._settle(ticket, call, usage, outcome)))
            settle_failed = False
            return reply
        finally:
            watcher.cancel()
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
            if settle_failed:  # nothing was produced for the client: nothing is charged
                await asyncio.shield(self._settle(ticket, call, Usage(), outcome, succeeded=False, notify=False))

    async def _fetch(self, call: Call, model: Model, body: dict, headers: dict, deadline: float,
                     attempts: Attempts, upstreams: dict[str, UpstreamClient]) -> tuple[UpstreamResponse, bytes | None]:
        """The upstream's answer: its whole body, or (payload None) a stream ready to relay."""
        response = await open_upstream(PATHS[call.endpoint], body, model, upstreams, headers, deadline, attempts)
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

    def _deadline(self, request: Request) -> float:
        """The client's own timeout (the OpenAI SDKs send it) bounds our retries."""
        budget = DEFAULT_DEADLINE_S
        hint = request.headers.get("x-stainless-timeout")
        if hint:
            try:
                budget = min(budget, max(1.0, float(hint)))
            except ValueError:
                pass
        return time.monotonic() + budget

    def _usage_of(self, status: int, payload: bytes, call: Call) -> Usage:
        if status >= 300:
            return Usage()
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = None
        usage = sse.usage_from(parsed) if isinstance(parsed, dict) else None
        if usage is not None:
            return usage
        return Usage(call.prompt_tokens, self._estimate_completion(parsed), 0)

    @staticmethod
    def _estimate_completion(parsed) -> int:
        """No usage from the upstream: count the characters of what it answered."""
        if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
            return 0
        text = []
        for choice in parsed["choices"]:
            if isinstance(choice, dict):
                message = choice.get("message")
                content = message.get("content") if isinstance(message, dict) else choice.get("text")
                if isinstance(content, str):
                    text.append(content)
        return estimate_text_tokens("".join(text))

    async def _settle(self, ticket: Ticket, call: Call, usage: Usage, outcome: Outcome, succeeded: bool = True,
                      notify: bool = True):
        """Settle once; `notify=False` when the caller reports the outcome itself (a failed call)."""
        if ticket.settled:
            return
        cost = cost_micros(call.price, usage)  # the price at admission: a reload may drop the model
        outcome.usage, outcome.cost_micros = usage, cost
        try:
            settled = await self.limiter.settle(ticket, call.model, usage, cost, outcome.tags, succeeded)
        except Exception:  # a bug: still counted, and the in-flight gauge still comes down
            log.exception("settling request %s failed", outcome.request_id)
            settled = None
        outcome.done = time.monotonic()
        if notify:
            self.observer.finished(outcome)
        if settled:
            self.budgets.on_settled(ticket, settled)

    # -- streaming ----------------------------------------------------------------------------
    async def _relay_stream(self, response: UpstreamResponse, call: Call, outcome: Outcome,
                            produced: StreamUsage) -> AsyncIterator[bytes]:
        """The upstream's events as they arrive; `produced` gets the usage once the stream ends
        (reported, or estimated when cut short) for the response to settle after its last byte."""
        splitter = sse.EventSplitter()
        usage: Usage | None = None
        text_chars = 0  # for an estimate when the upstream reports no usage
        keep_usage = call.client_wants_usage
        completed = False
        outcome.status = 200
        out: list[bytes] = []
        try:
            async for chunk in response.iter_chunks():
                out = []
                for event in splitter.feed(chunk):
                    if sse.carries_usage(event):
                        parsed = sse.parse_event(event)
                        found = sse.usage_from(parsed) if parsed else None
                        if found is not None:
                            usage = found
                            if not keep_usage and not parsed.get("choices"):
                                continue  # the usage-only chunk the client did not ask for
                    elif not keep_usage:
                        event = sse.strip_null_usage(event)
                    if sse.is_done(event):
                        completed = True
                    else:
                        text_chars += sse.text_length(event)
                    out.append(event)
                if out:
                    if outcome.first_byte_at == 0.0:
                        outcome.first_byte_at = time.monotonic()
                    relayed, out = b"".join(out), []
                    yield relayed
            if not completed:
                raise UpstreamBroken("the stream ended without [DONE]")
        except (UpstreamBroken, UpstreamReadTimeout) as exc:
            kind = "timeout" if isinstance(exc, UpstreamReadTimeout) else "stream_cut"
            outcome.attempts.errors.append((outcome.attempts.upstream, kind))
            outcome.stream_error = kind
            yield sse.error_event({"error": {
                "message": "The upstream stream was interrupted before it finished.",
                "type": "server_error", "param": None, "code": "upstream_error"}})
        except Exception:  # a bug: logged once, told to the client, settled like a cut stream
            log.exception("unexpected error relaying the stream of request %s", outcome.request_id)
            outcome.stream_error = "internal_error"
            if out:  # the events before the failing one, counted in text_chars already
                yield b"".join(out)
            yield sse.error_event({"error": {
                "message": "The proxy had an internal error.", "type": "server_error", "param": None,
                "code": None}})
        finally:
            if completed:
                response.release()
            else:
                response.close()  # cancels the upstream request
            outcome.finished_upstream = time.monotonic()
            if not completed and outcome.stream_error is None:
                outcome.client_gone = True
            if usage is None:  # cut short, or an upstream that reports none: characters / 4
                usage = Usage(call.prompt_tokens, -(-text_chars // 4), 0)
            produced.usage = usage

    # -- responses ----------------------------------------------------------------------------
    def _stream_headers(self, request_id: str, ticket: Ticket) -> list[tuple[bytes, bytes]]:
        headers = list(SSE_HEADERS)
        headers.append((b"x-request-id", request_id.encode("latin-1")))
        headers.extend((k.encode(), v.encode()) for k, v in ticket.headers.items())
        return headers

    def _passthrough(self, response: UpstreamResponse, payload: bytes, request_id: str, ticket: Ticket,
                     settle) -> SettlingResponse:
        headers = {name: value for name in PASS_RESPONSE_HEADERS
                   if (value := response.headers.get(name)) is not None and _header_safe(value)}
        headers["x-request-id"] = request_id
        headers.update(ticket.headers)
        media_type = response.headers.get("content-type", "application/json")
        if not _header_safe(media_type):
            media_type = "application/json"
        return SettlingResponse(payload, status_code=response.status, headers=headers, media_type=media_type,
                                settle=settle)

    @staticmethod
    def error_response(error: ProxyError, request_id: str, ticket: Ticket | None = None) -> Response:
        headers = dict(ticket.headers) if ticket is not None else {}
        headers.update(error.headers)
        headers["x-request-id"] = request_id
        return Response(error.body_bytes(), status_code=error.status, headers=headers,
                        media_type="application/json")
