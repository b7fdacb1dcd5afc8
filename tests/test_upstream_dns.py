"""An upstream that moves to a new address is reached again at once, not after the DNS cache's
5 minutes: the real aiohttp connector and its DNS cache, a resolver the test controls (injected
through the UpstreamClient seam), and the mock upstream on 127.0.0.2, then on 127.0.0.3."""

from __future__ import annotations

import asyncio
import socket
import time

import orjson
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.config import Upstream
from proxy.errors import UpstreamBroken, UpstreamConnectError
from proxy.mock_upstream import MockUpstream
from proxy.upstream.client import UpstreamClient
from tests.support.ports import free_port

HOST = "upstream.test"
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


class MovableResolver(AbstractResolver):
    """Resolves every name to `address`, which the test changes when the upstream moves."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        return [
            ResolveResult(
                hostname=host, host=self.address, port=port, family=socket.AF_INET, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        pass


async def chat(client: UpstreamClient) -> int:
    response = await client.send("POST", "/chat/completions", CHAT, {"content-type": "application/json"})
    await response.read()
    return response.status


async def test_a_moved_upstream_is_reached_within_a_second_of_a_connect_error():
    port = free_port()
    resolver = MovableResolver("127.0.0.2")
    client = UpstreamClient(
        "moving", Upstream(base_url=f"http://{HOST}:{port}/v1", connect_timeout_s=1, timeout_s=5), resolver=resolver
    )
    await client.start()
    old = MockUpstream(port=port, host="127.0.0.2").start()
    new = None
    try:
        assert await chat(client) == 200
        assert resolver.lookups == 1

        old.stop()  # the container is recreated at a new address, same port
        resolver.address = "127.0.0.3"
        new = MockUpstream(port=port, host="127.0.0.3").start()
        await asyncio.sleep(0.05)  # the client sees the old connection close

        try:
            first = await chat(client)  # may fail: the cached address is gone
        except (UpstreamConnectError, UpstreamBroken):
            first = None
        failed_at = time.monotonic()
        assert await chat(client) == 200, "the moved upstream was not reached"
        assert time.monotonic() - failed_at < 1.0
        assert first in (None, 200)
        assert new.requests, "the request reached the new address"
    finally:
        await client.close()
        if new is not None:
            new.stop()
        old.stop()
