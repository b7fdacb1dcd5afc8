"""An ASGI streaming response that notices a client leaving while the upstream is silent.

Starlette's StreamingResponse (ASGI 2.4) only learns of a disconnect on its next write; an LLM
may think for a minute between chunks. Here a listener waits for `http.disconnect` beside the
pump and cancels it at once, which closes the upstream request and settles in its `finally`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class SSEResponse:
    def __init__(self, chunks: AsyncIterator[bytes], status: int, headers: list[tuple[bytes, bytes]]):
        self.chunks = chunks
        self.status = status
        self.headers = headers

    async def __call__(self, scope, receive, send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        listener = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            await asyncio.wait((pump, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (listener, pump):
                if not task.done():
                    task.cancel()
            await asyncio.gather(pump, listener, return_exceptions=True)

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
