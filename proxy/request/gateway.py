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
from collections.abc import Awaitable, Callable, Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from ..apis import anthropic_errors
from ..config import Model, Target
from ..errors import ClientClosedRequest, ProxyError, StoreError
from ..http.responses import SSEResponse, error_response, request_id_of
from ..limits.admission import Ticket
from ..limits.quotas import NO_QUOTAS, QuotaCandidates
from ..limits.response_owners import Owner, ResponseOwners
from ..limits.types import Usage
from ..observe import Observer, Outcome
from ..snapshot import Snapshot, SnapshotHolder
from ..tags import parse_tags
from . import forward
from .admit import admit, now_ms
from .agent_relay import agent_stream_response
from .authenticate import Caller, presented_key
from .budget_fallback import admit_within_budget
from .call import API_OF, Call
from .end_user import end_user_of
from .holds import ProviderHolds
from .jwt_callers import JwtCallers, identify
from .queue import Entry, WaitQueue, priority_rank, waiter_scopes
from .read import read_call
from .relay import StreamUsage, passthrough, stream_response
from .settle import Settler, then_leave, usage_of
from .stored import owner_of

log = logging.getLogger("proxy.gateway")
FALLBACK_HEADER = "x-proxy-fallback"  # `budget`: the model's budget fallback served the call


async def _client_leaves(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Gateway:
    def __init__(
        self,
        snapshots: SnapshotHolder,
        settler: Settler,
        observer: Observer,
        owners: ResponseOwners,
        holds: ProviderHolds,
        jwt: JwtCallers | None = None,
        queue: WaitQueue | None = None,
    ) -> None:
        self.snapshots = snapshots
        self.holds = holds
        self.queue = queue or WaitQueue()
        self.jwt = jwt
        self.settler = settler
        self.limiter = settler.limiter
        self.observer = observer
        self.owners = owners

    async def handle(self, request: Request, endpoint: str, deployment: str | None = None) -> Response | SSEResponse:
        snapshot = self.snapshots.current
        snapshot.enter()
        outcome = Outcome(request_id=request_id_of(request), endpoint=endpoint, started_at=time.monotonic())
        handed_over = False
        try:
            presented = presented_key(request.headers)
            caller = outcome.caller = await identify(snapshot.keyring, snapshot.config, presented, self.jwt)
            call, model = await read_call(request, endpoint, caller, snapshot.config, deployment)
            outcome.model, outcome.stream = call.model, call.stream
            if snapshot.config.log_bodies:
                outcome.request_body = call.body
            outcome.tags = parse_tags(request.headers.get("x-proxy-tags"), call.body, caller.end_user)
            pinned = await self._pinned(call, caller) if call.endpoint == "responses" else None
            if caller.max_wait_ms:
                ticket, call, model = await self._queued(request, caller, call, model, snapshot, pinned, outcome)
            else:
                self.holds.refuse_if_held([pinned] if pinned is not None else model.targets)
                ticket, call, model = await self._admit(request, caller, call, model, snapshot, pinned)
            outcome.ticket, outcome.model, outcome.fallback_from = ticket, call.model, call.fallback_from
            self.observer.admitted(outcome)
            reply = await self._forward(request, call, model, ticket, outcome, snapshot, pinned)
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

    async def _admit(
        self, request: Request, caller: Caller, call: Call, model: Model, snapshot: Snapshot, pinned: Target | None
    ) -> tuple[Ticket, Call, Model]:
        """Admitted (by the model's budget fallback, maybe), or the client's error."""
        quotas_of = self._quotas_of(snapshot)
        if pinned is None and model.on_budget_exhausted is not None:  # a budget refusal may fall back
            return await admit_within_budget(
                self.limiter, caller, call, model, snapshot.config, request.headers, quotas_of
            )
        targets = [pinned] if pinned is not None else model.targets
        ticket = await admit(self.limiter, caller, call, model, snapshot.config, request.headers, quotas_of(targets))
        return ticket, call, model

    async def _queued(
        self,
        request: Request,
        caller: Caller,
        call: Call,
        model: Model,
        snapshot: Snapshot,
        pinned: Target | None,
        outcome: Outcome,
    ) -> tuple[Ticket, Call, Model]:
        """`_admit` for a caller whose refused requests may wait (`limits.max_wait_ms`), until the
        client leaves."""
        targets = [pinned] if pinned is not None else model.targets
        end_user = caller.end_user or end_user_of(call.body, request.headers, snapshot.config.end_user_identity)
        entry = Entry(
            team=caller.team_name,
            rank=priority_rank(caller.key.priority, request.headers),
            max_wait_s=caller.max_wait_ms / 1000,
            max_queue=caller.team.max_queue,
            share=caller.team.share,
            scopes=waiter_scopes(caller.key_name, caller.team_name, end_user, targets),
        )

        async def attempt() -> tuple[Ticket, Call, Model]:
            self.holds.refuse_if_held(targets)
            return await self._admit(request, caller, call, model, snapshot, pinned)

        async def release(admitted: tuple[Ticket, Call, Model]) -> None:
            ticket, served, by = admitted  # admitted as the client left: nothing was sent, nothing is charged
            await self.settler.settle(ticket, served, by.price_per_mtok, Usage(), outcome, False, notify=False)

        def waited(seconds: float) -> None:
            outcome.queued_s = seconds

        waiting = asyncio.ensure_future(self.queue.admit(entry, attempt, release, waited))
        leaving = asyncio.ensure_future(_client_leaves(request.receive))
        try:
            await asyncio.wait((waiting, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
        if waiting.cancelled():
            outcome.client_gone = True
            raise ClientClosedRequest("The client closed the connection while its request waited for capacity.")
        return waiting.result()

    def _failed(self, outcome: Outcome, error: ProxyError) -> Response:
        outcome.fail(error)
        self.observer.finished(outcome)
        if API_OF[outcome.endpoint] == "anthropic":
            return anthropic_error_response(error, outcome)
        return error_response(error, outcome.request_id, outcome.ticket.headers if outcome.ticket else None)

    def _quotas_of(self, snapshot: Snapshot) -> Callable[[Sequence[Target]], QuotaCandidates]:
        """A model's candidate targets for its upstream quotas: those its provider has not held (all
        of them when every one is held: forward waits out a short hold)."""

        def quotas_of(targets: Sequence[Target]) -> QuotaCandidates:
            if not snapshot.quotas:
                return NO_QUOTAS
            free = [target for target in targets if self.holds.remaining(target) <= 0]
            return snapshot.quotas.candidates(free or targets)

        return quotas_of

    async def _pinned(self, call: Call, caller: Caller) -> Target | None:
        """A Responses call continuing a stored response goes to the target that holds it."""
        previous = call.body.get("previous_response_id") if call.endpoint == "responses" else None
        if not isinstance(previous, str):
            return None
        owner = await owner_of(self.owners, previous, caller, param="previous_response_id")
        return Target(upstream=owner.upstream, model=owner.target_model)

    def _remembering(self, call: Call, outcome: Outcome) -> Callable[[str], Awaitable[None]] | None:
        """For a Responses call the upstream stores: remember who created the response (one write)."""
        if call.endpoint != "responses" or call.body.get("store") is False or outcome.caller is None:
            return None
        owner = Owner(outcome.caller.team_name, call.model, "", "")

        async def remember(response_id: str) -> None:
            attempts = outcome.attempts
            created = Owner(owner.team, owner.model, attempts.upstream, attempts.target_model)
            try:
                await self.owners.remember(response_id, created)
            except StoreError as exc:  # the response stands; only later reads of it will 404
                log.warning("could not remember the creator of a response: %s", exc)

        return remember

    async def _forward(
        self,
        request: Request,
        call: Call,
        model: Model,
        ticket: Ticket,
        outcome: Outcome,
        snapshot: Snapshot,
        pinned: Target | None = None,
    ) -> Response | SSEResponse:
        """Forward, then relay; settles here unless a response was handed over (it settles itself)."""
        price = model.price_per_mtok  # the price at admission: a reload may drop the model
        settle = self.settler.settle
        headers = forward.upstream_headers(request.headers, outcome.request_id, call.api)
        rate_headers = reply_headers(call, ticket, outcome.request_id)
        remember = self._remembering(call, outcome)
        targets = [pinned] if pinned is not None else model.targets
        if ticket.quotas.targets:  # from the target admission took (its upstream quota)
            targets = snapshot.quotas.forward_targets(ticket.quotas, ticket.decision.target, targets)
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
                self.holds,
                targets,
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
                settling = lambda: then_leave(snapshot, settle(ticket, call, price, produced.usage, outcome))  # noqa: E731
                if call.endpoint in ("chat", "completions"):
                    reply = stream_response(response, call, outcome, rate_headers, produced, settle=settling)
                else:
                    reply = agent_stream_response(
                        response, call, outcome, rate_headers, produced, settle=settling, on_created=remember
                    )
            else:
                outcome.upstream_finished_at = time.monotonic()
                usage = usage_of(response.status, payload, call)
                outcome.status = response.status
                if snapshot.config.log_bodies:
                    outcome.response_body = payload
                if remember is not None and response.status == 200:
                    created = response_id_in(payload)
                    if created is not None:
                        await remember(created)
                reply = passthrough(
                    response,
                    payload,
                    outcome.request_id,
                    rate_headers,
                    settle=lambda: then_leave(snapshot, settle(ticket, call, price, usage, outcome)),
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


def response_id_in(payload: bytes) -> str | None:
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    found = parsed.get("id") if isinstance(parsed, dict) else None
    return found if isinstance(found, str) and found else None


def reply_headers(call: Call, ticket: Ticket, request_id: str) -> dict[str, str]:
    """The rate-limit state of the tightest buckets, in the caller's API's own headers."""
    if call.api == "anthropic":
        headers = {"request-id": request_id} | anthropic_errors.rate_limit_headers(ticket.decision, now_ms())
    else:
        headers = ticket.headers
    if call.fallback_from is not None:
        headers[FALLBACK_HEADER] = "budget"
    return headers


def anthropic_error_response(error: ProxyError, outcome: Outcome) -> Response:
    """An error on the Messages paths, in Anthropic's shape, with its `request-id` and rate-limit state."""
    status, body, headers = anthropic_errors.anthropic_error(error, outcome.request_id)
    if outcome.ticket is not None:
        headers |= anthropic_errors.rate_limit_headers(outcome.ticket.decision, now_ms())
    headers["request-id"] = headers["x-request-id"] = outcome.request_id
    return Response(body, status_code=status, headers=headers, media_type="application/json")
