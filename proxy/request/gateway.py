"""One OpenAI call through the proxy: the stages of `proxy.request`, run in order.

    authenticate -> read -> admit -> forward -> relay -> settle

Settlement always happens exactly once per admitted request, in a `finally` shielded from
cancellation: after a full response, a failed upstream, a stream the client abandoned, a
stream the upstream cut, or a bug (which is also logged with its traceback and counted).
A request runs on the one `Snapshot` (config, keyring, upstream clients) it started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from ..config import Model
from ..errors import ClientClosedRequest, ProxyError
from ..http.responses import SSEResponse, error_response, request_id_of
from ..limits.admission import Ticket
from ..limits.types import Usage
from ..observe import Observer, Outcome
from ..snapshot import Snapshot, SnapshotHolder
from ..tags import parse_tags
from . import forward
from .admit import admit
from .authenticate import presented_key
from .call import Call
from .read import read_call
from .relay import StreamUsage, passthrough, stream_response
from .settle import Settler, usage_of

log = logging.getLogger("proxy.gateway")


async def _client_leaves(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _leaving(snapshot: Snapshot, settling: Awaitable[None]) -> None:
    """Settle, then let go of the snapshot the request ran on."""
    try:
        await settling
    finally:
        snapshot.leave()


class Gateway:
    def __init__(self, snapshots: SnapshotHolder, settler: Settler, observer: Observer) -> None:
        self.snapshots = snapshots
        self.settler = settler
        self.limiter = settler.limiter
        self.observer = observer

    async def handle(self, request: Request, endpoint: str) -> Response | SSEResponse:
        snapshot = self.snapshots.current
        snapshot.enter()
        outcome = Outcome(request_id=request_id_of(request), endpoint=endpoint, started_at=time.monotonic())
        handed_over = False
        try:
            caller = outcome.caller = snapshot.keyring.authenticate(presented_key(request.headers))
            call, model = await read_call(request, endpoint, caller, snapshot.config)
            outcome.model, outcome.stream = call.model, call.stream
            if snapshot.config.log_bodies:
                outcome.request_body = call.body
            outcome.tags = parse_tags(request.headers.get("x-proxy-tags"), call.body)
            ticket = outcome.ticket = await admit(self.limiter, caller, call, model, snapshot.config, request.headers)
            self.observer.admitted(outcome)
            reply = await self._forward(request, call, model, ticket, outcome, snapshot)
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

    def _failed(self, outcome: Outcome, error: ProxyError) -> Response:
        outcome.fail(error)
        self.observer.finished(outcome)
        return error_response(error, outcome.request_id, outcome.ticket.headers if outcome.ticket else None)

    async def _forward(
        self, request: Request, call: Call, model: Model, ticket: Ticket, outcome: Outcome, snapshot: Snapshot
    ) -> Response | SSEResponse:
        """Forward, then relay; settles here unless a response was handed over (it settles itself)."""
        price = model.price_per_mtok  # the price at admission: a reload may drop the model
        settle = self.settler.settle
        headers = forward.upstream_headers(request.headers, outcome.request_id)
        handed_over = False
        # the body is read: from now on the client can only say that it left; if it does before
        # the response starts, stop waiting on (or retrying) the upstream at once
        watcher = asyncio.ensure_future(_client_leaves(request.receive))
        fetch = asyncio.ensure_future(
            forward.fetch(
                call,
                model,
                forward.upstream_body(call),
                headers,
                forward.deadline_of(request.headers),
                outcome.attempts,
                snapshot.upstreams,
            )
        )
        try:
            await asyncio.wait((fetch, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                outcome.client_gone = True
                raise ClientClosedRequest("The client closed the connection before the response started.")
            response, payload = fetch.result()
            reply: Response | SSEResponse
            if payload is None:  # a stream
                produced = StreamUsage()
                reply = stream_response(
                    response,
                    call,
                    outcome,
                    ticket.headers,
                    produced,
                    settle=lambda: _leaving(snapshot, settle(ticket, call, price, produced.usage, outcome)),
                )
            else:
                outcome.upstream_finished_at = time.monotonic()
                usage = usage_of(response.status, payload, call)
                outcome.status = response.status
                if snapshot.config.log_bodies:
                    outcome.response_body = payload
                reply = passthrough(
                    response,
                    payload,
                    outcome.request_id,
                    ticket.headers,
                    settle=lambda: _leaving(snapshot, settle(ticket, call, price, usage, outcome)),
                )
            handed_over = True
            return reply
        finally:
            watcher.cancel()
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
            if not handed_over:  # nothing was produced for the client: nothing is charged
                await asyncio.shield(settle(ticket, call, price, Usage(), outcome, succeeded=False, notify=False))
