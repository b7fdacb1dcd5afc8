"""One pipelined RESP connection for the hot path: the admit and settle scripts, nothing else.

Measured here (bench/README.md): an EVALSHA through redis-py's asyncio client costs 63-73 µs of
CPU, the same call written with `hiredis.pack_command` on one multiplexed connection and parsed
by `hiredis.Reader` 11-16 µs. With two calls per request that is a quarter of the proxy's CPU.
So the hot path uses this; everything else (reads, Redis Cluster) stays on redis-py.

Replies come back in request order, so each call is a future in a FIFO. A call that times out
aborts the connection (a silent server is taken for a dead one); the next call reconnects. One
deadline (`timeout_s` from the call, or the caller's own) covers connecting, AUTH and SELECT, and
the reply. Callers never reconnect one after the other: every call that finds no connection
awaits the same connect attempt, and after a connect fails calls fail at once for a back-off
(100 ms doubling to 500 ms, reset by a connect that works) instead of trying again, so an
unreachable Redis costs each request at most its timeout, whatever the concurrency.
Only standalone Redis (`redis://`, `rediss://`, `unix://`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast

import hiredis
from redis.connection import parse_url

from ..errors import RespConnectionError, RespReplyError, RespUnreachable

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 0.5
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    requirement = CERT_REQS.get(str(options.get("ssl_cert_reqs", "required")).lower(), ssl.CERT_REQUIRED)
    if requirement != ssl.CERT_REQUIRED:
        context.check_hostname = False
        context.verify_mode = requirement
    return context


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.unrequested: object = None  # a reply that came with no call waiting for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:
                # a reply nobody asked for: Redis refusing the connection as it opens (protected
                # mode's DENIED) or a lost reply shifting the stream; nothing more here can be trusted
                self.unrequested = reply
                self.abort()
                return
            future = self.pending.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.unrequested is not None:
            error = RespConnectionError(f"Redis sent a reply nobody asked for: {self.unrequested!r}")
        else:
            error = RespConnectionError(f"connection lost: {exc!r}" if exc else "connection closed")
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True  # no new call may queue behind the aborted ones
            try:
                self.transport.abort()
            except RuntimeError:  # uvloop: already closed
                pass


class RespClient:
    def __init__(self, url: str, timeout_s: float):
        # the URL means here exactly what it means to redis-py, which serves every other call
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s
        self._unix_path = options.get("path")
        self._host = options.get("host") or "127.0.0.1"
        self._port = int(options.get("port") or 6379)
        self._ssl = _ssl_context(options) if url.startswith("rediss://") else None
        self._username = options.get("username")
        self._password = options.get("password")
        self._db = int(options.get("db") or 0)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None  # the one attempt every caller awaits
        self._backoff_s = 0.0  # after a failed connect; 0 once one works
        self._retry_at = 0.0  # loop time before which calls fail without trying to connect

    def deadline(self) -> float:
        """The loop time by which a call starting now must be answered."""
        return asyncio.get_running_loop().time() + self.timeout_s

    async def call(self, *args: Any, deadline: float | None = None) -> Any:
        """One command, answered by `deadline` (loop time; default: `timeout_s` from now).

        Returns the reply; raises RespReplyError, or RespConnectionError when Redis could not be
        reached or did not answer in time."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeout_s
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connected(deadline)
            if loop.time() >= deadline:  # connected too late: don't abort a fresh connection for it
                raise RespUnreachable(f"no connection within {self.timeout_s}s")
        return await self._send(protocol, args, deadline)

    async def _send(self, protocol: _Protocol, args: tuple[Any, ...], deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        transport = protocol.transport
        if protocol.closed or transport is None or transport.is_closing():
            if protocol.unrequested is not None:
                raise RespUnreachable(f"Redis sent a reply nobody asked for: {protocol.unrequested!r}")
            raise RespUnreachable("connection closed")
        try:
            transport.write(hiredis.pack_command(args))
        except (RuntimeError, OSError) as exc:  # uvloop: the peer closed it before connection_lost ran
            protocol.abort()
            raise RespUnreachable(f"write failed: {exc!r}") from None
        future = loop.create_future()
        protocol.pending.append(future)  # after the write: no reply can arrive in between (no await)
        timer = loop.call_at(deadline, self._timed_out, protocol, future)
        try:
            reply = await future
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise RespReplyError(str(reply))
        return reply

    def _timed_out(self, protocol: _Protocol, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(RespConnectionError(f"no reply within {self.timeout_s}s"))
            protocol.abort()

    async def _connected(self, deadline: float) -> _Protocol:
        """The connection of the attempt in progress, or of a new one unless backing off."""
        loop = asyncio.get_running_loop()
        attempt = self._connecting
        if attempt is None:
            if loop.time() < self._retry_at:
                raise RespUnreachable(f"Redis unreachable; next connect attempt in {self._retry_at - loop.time():.2f}s")
            attempt = self._connecting = loop.create_task(self._connect())
            attempt.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(attempt)  # a caller that gives up leaves it to the others
        except TimeoutError:
            raise RespUnreachable(f"no connection within {self.timeout_s}s") from None
        except RespConnectionError as exc:
            raise RespUnreachable(str(exc)) from None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            protocol = await self._open(loop.time() + self.timeout_s)
        except RespConnectionError:
            self._backoff_s = min(max(2 * self._backoff_s, BACKOFF_FIRST_S), BACKOFF_MAX_S)
            self._retry_at = loop.time() + self._backoff_s
            raise
        finally:
            self._connecting = None
        self._backoff_s = 0.0
        self._protocol = protocol
        return protocol

    async def _open(self, deadline: float) -> _Protocol:
        """A new connection, authenticated and on its database by `deadline`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                if self._unix_path:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._unix_path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port, ssl=self._ssl)
        except (TimeoutError, OSError) as exc:
            raise RespConnectionError(f"cannot connect: {exc!r}") from None
        try:
            if self._password is not None:
                credentials = (self._username, self._password) if self._username else (self._password,)
                await self._send(protocol, ("AUTH", *credentials), deadline)
            if self._db:
                await self._send(protocol, ("SELECT", self._db), deadline)
        except BaseException:
            protocol.abort()  # a refused AUTH or SELECT must not leave the socket open
            raise
        return protocol

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None


def _retrieve(attempt: asyncio.Task[_Protocol]) -> None:
    """Mark a failed connect attempt's error as seen (its callers may all have given up)."""
    if not attempt.cancelled():
        attempt.exception()
