"""Stored responses: GET and DELETE /v1/responses/{id}, POST .../cancel, GET .../input_items.

Each goes to the upstream that created the response, and only for keys of the team that created
it (any other key, or an id the proxy never saw, gets 404: nobody learns another team's ids
exist). A read is counted in the request buckets and charged nothing. GET ?stream=true (with
`starting_after`) streams a response's events again: relayed as they come, the request settled
(and its parallel slot held) until the last byte. `owner_of` also routes a
POST /v1/responses with `previous_response_id`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Mapping
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from ..config import Price
from ..errors import (
    NotFound,
    ProxyError,
    StoreError,
    StoreUnavailable,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReadTimeout,
    UpstreamTimeout,
)
from ..http.responses import SSEResponse, error_response, request_id_of
from ..limits.response_owners import Owner, ResponseOwners
from ..limits.types import Usage
from ..observe import Observer, Outcome
from ..snapshot import SnapshotHolder
from .admit import admit
from .agent_relay import replay_response
from .authenticate import Caller, presented_key
from .call import Call
from .forward import deadline_of, upstream_headers
from .jwt_callers import JwtCallers, identify
from .relay import passthrough
from .settle import Settler, then_leave

log = logging.getLogger("proxy.gateway")
NO_PRICE = Price()


async def owner_of(owners: ResponseOwners, response_id: str, caller: Caller, param: str | None = None) -> Owner:
    """The creator of `response_id`, if the caller's team is it; else a 404."""
    try:
        owner = await owners.owner(response_id)
    except StoreError as exc:
        log.warning("response owner lookup failed: %s", exc)
        raise StoreUnavailable(
            "The rate-limit store is unavailable; please retry shortly.", headers={"retry-after": "1"}
        ) from None
    if owner is None or owner.team != caller.team_name:
        raise NotFound(f"No response found with id '{response_id}'.", param=param)
    return owner


class StoredResponses:
    def __init__(
        self,
        snapshots: SnapshotHolder,
        settler: Settler,
        observer: Observer,
        owners: ResponseOwners,
        jwt: JwtCallers | None = None,
    ) -> None:
        self.jwt = jwt
        self.snapshots = snapshots
        self.settler = settler
        self.observer = observer
        self.owners = owners

    async def handle(self, request: Request) -> Response | SSEResponse:
        response_id: str = request.path_params["response_id"]
        suffix = request.url.path.rsplit(response_id, 1)[1]  # "", "/cancel" or "/input_items"
        snapshot = self.snapshots.current
        snapshot.enter()
        outcome = Outcome(request_id=request_id_of(request), endpoint="responses", started_at=time.monotonic())
        handed_over = False  # a stream settles, and leaves the snapshot, after its last byte
        try:
            presented = presented_key(request.headers)
            caller = outcome.caller = await identify(snapshot.keyring, snapshot.config, presented, self.jwt)
            owner = await owner_of(self.owners, response_id, caller)
            client = snapshot.upstreams.get(owner.upstream)
            if client is None:  # a reload removed the upstream that holds it
                raise NotFound(f"No response found with id '{response_id}'.")
            call = Call("responses", {}, owner.model, False, False, 0, 0)
            outcome.model = owner.model
            ticket = outcome.ticket = await admit(
                self.settler.limiter, caller, call, None, snapshot.config, request.headers
            )
            self.observer.admitted(outcome)
            outcome.attempts.upstream, outcome.attempts.target_model = owner.upstream, owner.target_model

            def settle() -> Awaitable[None]:
                succeeded = outcome.status < 400
                return self.settler.settle(ticket, call, NO_PRICE, Usage(), outcome, succeeded=succeeded)

            try:
                path = f"/responses/{quote(response_id, safe='')}{suffix}"
                if request.url.query:
                    path += "?" + request.url.query
                headers = upstream_headers(request.headers, outcome.request_id)
                remaining = deadline_of(request.headers) - time.monotonic()
                body = await request.body() if request.method == "POST" else None
                try:
                    upstream = await client.send(request.method, path, body, headers, read_timeout=remaining)
                    if upstream.status == 200 and _is_event_stream(upstream.headers):
                        outcome.stream = True
                        first = _first_sequence(request.query_params.get("starting_after"))
                        leaving = lambda: then_leave(snapshot, settle())  # noqa: E731
                        reply: Response | SSEResponse = replay_response(
                            upstream, outcome, ticket.headers, first, settle=leaving
                        )
                        handed_over = True
                        return reply
                    payload = await upstream.read()
                except UpstreamReadTimeout:
                    raise UpstreamTimeout("The upstream timed out while sending its response.") from None
                except (UpstreamConnectError, UpstreamBroken):
                    raise UpstreamError(f"The upstream failed: upstream '{owner.upstream}' did not answer.") from None
                outcome.status = upstream.status
                outcome.upstream_finished_at = time.monotonic()
                reply = passthrough(upstream, payload, outcome.request_id, ticket.headers, settle=_nothing)
            except ProxyError as error:
                outcome.fail(error)  # told to the observers by the settlement
                raise
            finally:
                if not handed_over:
                    await settle()
            return reply
        except ProxyError as error:
            outcome.fail(error)
            if outcome.ticket is None:
                self.observer.finished(outcome)
            return error_response(error, outcome.request_id, outcome.ticket.headers if outcome.ticket else None)
        finally:
            if not handed_over:
                snapshot.leave()


def _is_event_stream(headers: Mapping[str, str]) -> bool:
    return headers.get("content-type", "").startswith("text/event-stream")


def _first_sequence(starting_after: str | None) -> int:
    """The sequence number a replay starts at: after `starting_after` (the client's query; 0 when
    it is not a plain number the upstream could have accepted)."""
    if starting_after is None or len(starting_after) > 18:
        return 0
    return int(starting_after) + 1 if starting_after.isascii() and starting_after.isdigit() else 0


async def _nothing() -> None:
    """A read settles before its reply is sent: there is nothing to charge."""
