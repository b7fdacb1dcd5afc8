from __future__ import annotations

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """The session's private Redis (real redis-server, or fakeredis' TCP server as fallback)."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running, flushed Redis."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url
