"""The proxy's HTTP responses: errors in OpenAI's shape, and responses that settle their request.

`error_response`: a `ProxyError` as OpenAI's error JSON with its status and headers, and the
request id (`request_id_of`: the client's own `x-request-id` when it gave a usable one).

Responses that settle their request after the last byte, off the client's critical path:

`SSEResponse`: Starlette's StreamingResponse (ASGI 2.4) only learns of a disconnect on its next
write; an LLM may think for a minute between chunks. Here a listener waits for `http.disconnect`
beside the pump and cancels it at once, which closes the upstream request (the stream's own
`finally`). `SettlingResponse`: a complete body. Both run `settle` once the response is sent, or
failed, or was cancelled: in their `finally`, shielded, so settlement is never skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import ProxyError

Settle = Callable[[], Awaitable[object]]
log = logging.getLogger("proxy.gateway")

_ID_PREFIX = "req_" + os.urandom(8).hex()  # unique per process; the counter makes it unique per request
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A fresh id, unique across processes: for the limiter's store keys, and for a client that sent none."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def request_id_of(request: Request) -> str:
    """The id echoed to the client, logged and sent upstream: the client's own when it gave one.
    Never a store key: a client could reuse it (see `new_request_id` for the limiter's)."""
    given = request.headers.get("x-request-id", "").strip(" \t")  # a field value excludes its surrounding OWS
    if 0 < len(given) <= 128 and given.isprintable():
        return given
    return new_request_id()


def error_response(error: ProxyError, request_id: str, rate_headers: Mapping[str, str] | None = None) -> Response:
    """OpenAI's error JSON; a refused or failed admitted call keeps its x-ratelimit-* headers."""
    headers = dict(rate_headers) if rate_headers is not None else {}
    headers.update(error.headers)
    headers["x-request-id"] = request_id
    return Response(error.body_bytes(), status_code=error.status, headers=headers, media_type="application/json")


class SettlingResponse(Response):
    def __init__(self, content: bytes, *, settle: Settle, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.settle())


class SSEResponse:
    def __init__(
        self, chunks: AsyncGenerator[bytes, None], status: int, headers: list[tuple[bytes, bytes]], settle: Settle
    ) -> None:
        self.chunks = chunks
        self.status = status
        self.headers = headers
        self.settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        listener = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            await asyncio.wait((pump, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (listener, pump):
                if not task.done():
                    task.cancel()
            failed, _ = await asyncio.gather(pump, listener, return_exceptions=True)
            if isinstance(failed, Exception):  # never swallowed: the relay handles its own, this is a bug
                log.error("the stream failed", exc_info=failed)
            await asyncio.shield(self.settle())

    async def _pump(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client left between chunks
        finally:
            await self.chunks.aclose()

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
