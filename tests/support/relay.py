"""A TCP relay a test can partition: 127.0.0.1:`port` forwards to 127.0.0.1:`target_port`.

`partition()` makes it behave like a firewall that drops every packet: open connections stop
forwarding (what the client sends is swallowed, nothing comes back) and a new connection hangs in
connect (the port's listen backlog is kept full, so the kernel drops its SYN). `heal()` closes the
partitioned connections and forwards again. `stall(seconds)` holds what the connections open
now send to Redis and delivers it that much later (even after the client has closed them, as a
server reads what reached its socket before the close), while new connections pass at once: a
command that timed out on a stuck connection then reaches Redis after those sent on the next one.
The relay runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any

from .ports import free_port

CHUNK = 65_536
FILLER_CONNECT_S = 0.2
MAX_FILLERS = 16


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.partitioned = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._links: set[_Link] = set()
        self._held: socket.socket | None = None  # the partitioned port: listening, never accepting
        self._fillers: list[socket.socket] = []
        self._run(self._listen())

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port, reuse_address=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link = _Link()
        self._writers |= {writer, up_writer}
        self._links.add(link)
        pipes = [
            asyncio.ensure_future(self._to_server(reader, up_writer, link)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            self._links.discard(link)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        """Client to server: read at once, delivered in order once the link's stall is over."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def deliver() -> None:
            while (data := await queue.get()) is not None:
                if (delay := link.stalled_until - loop.time()) > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            try:
                while data := await reader.read(CHUNK):
                    if not self.partitioned:
                        queue.put_nowait(data)
            except OSError:
                pass
            queue.put_nowait(None)
            await delivering
        except OSError:
            pass
        finally:
            delivering.cancel()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                if not self.partitioned:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass

    def stall(self, seconds: float) -> None:
        self._run(self._stall(seconds))

    async def _stall(self, seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        for link in self._links:
            link.stalled_until = until

    def partition(self) -> None:
        self.partitioned = True
        self._run(self._stop_listening())
        held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", self.port))
        held.listen(0)
        self._held = held
        for _ in range(MAX_FILLERS):  # fill the backlog until a connect is no longer answered
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(FILLER_CONNECT_S)
            try:
                filler.connect(("127.0.0.1", self.port))
            except (TimeoutError, OSError):
                filler.close()
                return
            self._fillers.append(filler)
        raise RuntimeError("the listen backlog never filled up")

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket; open connections stay
            self._server = None

    def heal(self) -> None:
        self._release_port()
        self._run(self._heal())

    async def _heal(self) -> None:
        for writer in list(self._writers):  # connections that lived through the partition are gone
            writer.close()
        self.partitioned = False
        await self._listen()

    def _release_port(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._fillers = []
        if self._held is not None:
            self._held.close()
            self._held = None

    def close(self) -> None:
        self._release_port()
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _close(self) -> None:
        await self._stop_listening()
        for writer in list(self._writers):
            writer.close()


class _Link:
    """One relayed connection."""

    def __init__(self) -> None:
        self.stalled_until = 0.0  # loop time before which what the client sends is held
