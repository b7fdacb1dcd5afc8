"""One pipelined RESP connection for the hot path: the admit and settle scripts, nothing else.

Measured here (bench/README.md): an EVALSHA through redis-py's asyncio client costs 63-73 µs of
CPU, the same call written with `hiredis.pack_command` on one multiplexed connection and parsed
by `hiredis.Reader` 11-16 µs. With two calls per request that is a quarter of the proxy's CPU.
So the hot path uses this; everything else (reads, Redis Cluster) stays on redis-py.

Replies come back in request order, so each call is a future in a FIFO. A call that times out
aborts the connection (its reply might still be on the way and would shift every later one);
the next call reconnects. Only standalone Redis (`redis://`, `rediss://`, `unix://`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import hiredis
from redis.connection import parse_url

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _ssl_context(options: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    requirement = CERT_REQS.get(str(options.get("ssl_cert_reqs", "required")).lower(), ssl.CERT_REQUIRED)
    if requirement != ssl.CERT_REQUIRED:
        context.check_hostname = False
        context.verify_mode = requirement
    return context


class RespConnectionError(Exception):
    """The connection failed, broke or timed out."""


class RespReplyError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT)."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.pending.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc) -> None:
        self.closed = True
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
        options = parse_url(url)
        self.timeout_s = timeout_s
        self._unix_path = options.get("path")
        self._host = options.get("host") or "127.0.0.1"
        self._port = int(options.get("port") or 6379)
        self._ssl = _ssl_context(options) if url.startswith("rediss://") else None
        self._username = options.get("username")
        self._password = options.get("password")
        self._db = int(options.get("db") or 0)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def call(self, *args):
        """One command; returns the reply, raises RespReplyError or RespConnectionError."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await self._send(protocol, args)

    async def _send(self, protocol: _Protocol, args):
        loop = asyncio.get_running_loop()
        if protocol.closed or protocol.transport.is_closing():
            raise RespConnectionError("connection closed")
        try:
            protocol.transport.write(hiredis.pack_command(args))
        except (RuntimeError, OSError) as exc:  # uvloop: the peer closed it before connection_lost ran
            protocol.abort()
            raise RespConnectionError(f"write failed: {exc!r}") from None
        future = loop.create_future()
        protocol.pending.append(future)  # after the write: no reply can arrive in between (no await)
        timer = loop.call_later(self.timeout_s, self._timed_out, protocol, future)
        try:
            reply = await future
        finally:
            timer.cancel()
        if isinstance(reply, hiredis.ReplyError):
            raise RespReplyError(str(reply))
        return reply

    def _timed_out(self, protocol: _Protocol, future: asyncio.Future) -> None:
        if not future.done():
            future.set_exception(RespConnectionError(f"no reply within {self.timeout_s}s"))
            protocol.abort()

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                if self._unix_path:
                    connecting = loop.create_unix_connection(_Protocol, self._unix_path)
                else:
                    connecting = loop.create_connection(_Protocol, self._host, self._port, ssl=self._ssl)
                _, protocol = await asyncio.wait_for(connecting, self.timeout_s)
            except (TimeoutError, OSError) as exc:
                raise RespConnectionError(f"cannot connect: {exc!r}") from None
            try:
                if self._password is not None:
                    credentials = (self._username, self._password) if self._username else (self._password,)
                    await self._send(protocol, ("AUTH", *credentials))
                if self._db:
                    await self._send(protocol, ("SELECT", self._db))
            except BaseException:
                protocol.abort()  # a refused AUTH or SELECT must not leave the socket open
                raise
            self._protocol = protocol
            return protocol

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None
