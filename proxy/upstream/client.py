"""The seam to upstream HTTP: one pooled aiohttp session per upstream.

aiohttp, not httpx, on this path: measured here, httpx's default transport spends ~7 ms of CPU
per request at 64 concurrent requests, aiohttp's client 0.6-1 ms (shared/PERF-NOTES.md).
Callers see only `UpstreamClient.send` and `UpstreamResponse`; no aiohttp type leaks out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from ..config import Upstream
from ..errors import UpstreamBroken, UpstreamConnectError, UpstreamReadTimeout

# How long a resolved address is reused; a connect error forgets it at once (the upstream moved).
DNS_CACHE_TTL_S = 300


class UpstreamResponse:
    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except TimeoutError as exc:
            raise UpstreamReadTimeout() from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(str(exc)) from exc
        finally:
            self._response.release()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive from the network (no re-chunking). When the connection breaks, the
        bytes that arrived before the break come first, then the error."""
        content = self._response.content
        try:
            async for chunk in content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            rest = _buffered(content)
            if rest:
                yield rest
            if isinstance(exc, TimeoutError):
                raise UpstreamReadTimeout() from exc
            raise UpstreamBroken(str(exc)) from exc

    def close(self) -> None:
        """Drop the connection: cancels the upstream request if it is still running."""
        self._response.close()

    def release(self) -> None:
        self._response.release()


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """What the reader holds after it failed. aiohttp's readany() raises a payload error before
    returning data it already buffered (content and a dropped connection in the same read), and
    its public read_nowait() raises too; `_read_nowait` is the one way to those bytes."""
    try:
        return content._read_nowait(-1)
    except Exception:
        return b""


class UpstreamClient:
    def __init__(self, name: str, config: Upstream, *, resolver: AbstractResolver | None = None):
        self.name = name
        self.config = config
        self.base_url = config.base_url
        self._api_key = config.resolve_api_key()
        self._session: aiohttp.ClientSession | None = None
        self._connector: aiohttp.TCPConnector | None = None
        self._resolver = resolver  # None: aiohttp's default (the system's resolver)
        url = URL(config.base_url)
        self._dns_key = (url.raw_host or "", url.port or 0)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s, sock_read=config.timeout_s)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, ttl_dns_cache=DNS_CACHE_TTL_S, resolver=self._resolver
        )
        self._connector = connector
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )

    @property
    def closed(self) -> bool:
        return self._session is None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _forget_address(self) -> None:
        """After a connect error, resolve the host again next time: it may have moved."""
        if self._connector is not None:
            self._connector.clear_dns_cache(*self._dns_key)

    def auth_headers(self) -> dict[str, str]:
        if not self._api_key:
            return {}
        if self.config.api == "anthropic":
            return {"x-api-key": self._api_key}
        return {"Authorization": f"Bearer {self._api_key}"}

    async def send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], *, read_timeout: float | None = None
    ) -> UpstreamResponse:
        """Send one request; returns once the status line and headers have arrived."""
        if self._session is None:
            raise UpstreamConnectError("the upstream client is closed")
        timeout = self._timeout
        if read_timeout is not None and read_timeout < self.config.timeout_s:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s, sock_read=read_timeout)
        try:
            response = await self._session.request(
                method,
                self.base_url + path,
                data=body,
                headers={**headers, **self.auth_headers()},
                timeout=timeout,
                allow_redirects=False,
            )
        except aiohttp.ServerTimeoutError as exc:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                self._forget_address()
                raise UpstreamConnectError(f"connect timeout after {self.config.connect_timeout_s}s") from exc
            raise UpstreamReadTimeout() from exc
        except TimeoutError as exc:
            raise UpstreamReadTimeout() from exc
        except aiohttp.ClientConnectorError as exc:
            self._forget_address()
            raise UpstreamConnectError(str(exc.os_error) or "connection failed") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamBroken(str(exc) or type(exc).__name__) from exc
        return UpstreamResponse(response)
