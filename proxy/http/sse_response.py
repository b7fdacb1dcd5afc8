"""Responses that settle their request after the last byte, off the client's critical path.

`SSEResponse`: Starlette's StreamingResponse (ASGI 2.4) only learns of a disconnect on its next
write; an LLM may think for a minute between chunks. Here a listener waits for `http.disconnect`
beside the pump and cancels it at once, which closes the upstream request (the stream's own
`finally`). `SettlingResponse`: a complete body. Both run `settle` once the response is sent, or
failed, or was cancelled: in their `finally`, shielded, so settlement is never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

Settle = Callable[[], Awaitable[object]]
log = logging.getLogger("proxy.gateway")


class SettlingResponse(Response):
    def __init__(self, content: bytes, *, settle: Settle, **kwargs):
        super().__init__(content, **kwargs)
        self.settle = settle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self.settle())


class SSEResponse:
    def __init__(self, chunks: AsyncIterator[bytes], status: int, headers: list[tuple[bytes, bytes]],
                 settle: Settle):
        self.chunks = chunks
        self.status = status
        self.headers = headers
        self.settle = settle

    async def __call__(self, scope, receive, send) -> None:
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

    async def _pump(self, send) -> None:
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
    async def _wait_disconnect(receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
