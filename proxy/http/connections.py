"""The HTTP/1.1 server's defences against hostile connections: uvicorn's httptools protocol with a
header size limit, header and body timeouts and a per-process cap on open connections.

uvicorn itself has none of these: httptools parses a header line of any length (48 MiB cost 2.3 s
of CPU), and a connection that sends its headers one byte at a time is held for ever. Here:

- the request line and headers of a request may take `server.max_header_bytes`; one byte more is
  answered 431 and the connection closed, without parsing further;
- the headers must be complete `server.header_timeout_s` after the connection (or, on a kept-alive
  connection, the next request) started, and the body `server.body_timeout_s` after the headers;
  otherwise 408 and close;
- beyond `server.max_connections` open connections, a new one closes the connection that has been
  waiting longest for its headers (a slowloris, or an idle kept-alive one), so clients that send
  whole requests keep being served; only when every connection is busy with a request is the new
  one refused (503).

The hot path pays almost nothing: bytes are counted only while headers are incomplete, and the
timers are armed only when a request's headers (or body) did not arrive in one read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import orjson
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from ..config import Server

log = logging.getLogger("proxy.connections")


def _error_response(status: int, error_type: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error JSON, written before any app runs."""
    payload = orjson.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(payload),
            b"connection: close\r\n\r\n",
            payload,
        )
    )


HEADERS_TOO_LARGE = _error_response(
    431, "invalid_request_error", "request_header_fields_too_large", "The request's headers are too large."
)
REQUEST_TIMEOUT = _error_response(
    408, "invalid_request_error", "request_timeout", "The request did not arrive in time."
)
TOO_MANY_CONNECTIONS = _error_response(
    503, "server_error", "too_many_connections", "The server has too many open connections; retry shortly."
)


class ConnectionGuard:
    """One server's connection bookkeeping; `protocol()` is the class to give uvicorn's `http=`.

    Pickled into each worker under `--workers N` with its settings only: every process counts its
    own connections."""

    def __init__(self, settings: Server) -> None:
        self.settings = settings
        self.open: set[GuardedHttpToolsProtocol] = set()
        # connections waiting for a request's headers, oldest first (dicts keep insertion order)
        self.waiting: dict[GuardedHttpToolsProtocol, None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["settings"])  # type: ignore[misc]

    def protocol(self) -> functools.partial[GuardedHttpToolsProtocol]:
        return functools.partial(GuardedHttpToolsProtocol, guard=self)

    def opened(self, connection: GuardedHttpToolsProtocol) -> bool:
        """Count a new connection; False when it must be refused (every other one is busy)."""
        if len(self.open) >= self.settings.max_connections:
            victim = next(iter(self.waiting), None)
            if victim is None:
                return False
            self.closed(victim)
            victim.evict()
        self.open.add(connection)
        self.waiting[connection] = None
        return True

    def closed(self, connection: GuardedHttpToolsProtocol) -> None:
        self.open.discard(connection)
        self.waiting.pop(connection, None)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard: ConnectionGuard,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.max_header_bytes = guard.settings.max_header_bytes
        self.header_bytes = 0
        self.awaiting_headers = True
        self.in_body = False
        self.deadline: asyncio.TimerHandle | None = None

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.opened(self):
            log.warning("refused a connection: %d connections are open", len(self.guard.open))
            self._answer_and_close(TOO_MANY_CONNECTIONS)
            return
        self._arm(self.guard.settings.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        self._disarm()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a new connection (this one sent no complete request)."""
        self._disarm()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.awaiting_headers:
            super().data_received(data)
        elif self.transport.is_closing():
            return
        else:
            room = self.max_header_bytes - self.header_bytes
            if len(data) <= room:
                self.header_bytes += len(data)
                super().data_received(data)
            else:  # feed what the limit allows: the rest is a body only if the headers ended in it
                super().data_received(data[:room])
                if self.transport.is_closing():
                    return
                if self.awaiting_headers:
                    self._answer_and_close(HEADERS_TOO_LARGE)
                    return
                self.data_received(data[room:])
                return
        if self.deadline is None and not self.transport.is_closing():
            if self.awaiting_headers and self.header_bytes:
                self._arm(self.guard.settings.header_timeout_s)
            elif self.in_body:
                self._arm(self.guard.settings.body_timeout_s)

    # -- parser callbacks ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self.in_body = True
        self.header_bytes = 0
        self.guard.waiting.pop(self, None)
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_body = False
        self.awaiting_headers = True
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.awaiting_headers and not self.pipeline and not self.transport.is_closing():
            self.guard.waiting[self] = None

    # -- timeouts --------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self.deadline = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if self.awaiting_headers:
            if busy:  # the next request's headers trickle in while this one's response runs
                self._arm(self.guard.settings.header_timeout_s)
            else:
                self._answer_and_close(REQUEST_TIMEOUT)
            return
        if busy and not cycle.response_started:  # the body is late: the app reads a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
            self._answer_and_close(REQUEST_TIMEOUT)
        else:  # the app already answered (or is answering): nothing more to say
            self._disarm()
            self.transport.close()

    def _answer_and_close(self, response: bytes) -> None:
        self._disarm()
        self.awaiting_headers = False  # nothing more is parsed
        self.transport.write(response)
        self.transport.close()
