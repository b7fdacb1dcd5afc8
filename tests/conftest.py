from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_cluster import RedisCluster, cluster_available, cluster_required
from tests.support.redis_server import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    _share_compiled_modules()
    _share_ca_bundle_contexts()


def _share_compiled_modules() -> None:
    """The suite starts ~200 Python processes (replicas, mocks, CLI runs). With
    PYTHONDONTWRITEBYTECODE set (as on our CI machine) each compiled the proxy's ~100 modules
    again: ~70 ms of CPU per start. They share compiled files in a cache outside the source tree
    instead, checked against each source's mtime as usual."""
    if "PYTHONDONTWRITEBYTECODE" not in os.environ or "PYTHONPYCACHEPREFIX" in os.environ:
        return
    # the user's own cache, not a guessable path in /tmp that another user could fill first
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm-ratelimit-proxy" / "pycache"
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return  # no writable home: children compile as before
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)


def _share_ca_bundle_contexts() -> None:
    """Every httpx client, the SDKs' too, loads certifi's CA bundle into a new SSL context when it
    is made (~20 ms of CPU), for connections that are all plain HTTP on 127.0.0.1 here: the suite
    made ~2,000 of them, ~40 s of its CPU. In test processes the contexts made from the bundle
    httpx trusts by default (SSL_CERT_FILE when set, as here, else certifi's; no test changes
    one) are made once per file and shared; any other context, such as the proxy's own for
    rediss:// with client certificates, is made as before."""
    import certifi

    make = ssl.create_default_context
    bundles = {certifi.where(), os.environ.get("SSL_CERT_FILE")} - {None}
    made: dict[Any, ssl.SSLContext] = {}

    @functools.wraps(make)
    def shared(purpose: Any = ssl.Purpose.SERVER_AUTH, *, cafile: Any = None, capath: Any = None, cadata: Any = None):
        if cafile not in bundles or capath is not None or cadata is not None:
            return make(purpose, cafile=cafile, capath=capath, cadata=cadata)
        if (purpose, cafile) not in made:
            made[purpose, cafile] = make(purpose, cafile=cafile)
        return made[purpose, cafile]

    ssl.create_default_context = shared


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


@pytest.fixture(scope="session")
def redis_cluster():
    """The session's private 3-master Redis Cluster; skipped without redis-server and redis-cli,
    unless LLM_PROXY_REQUIRE_CLUSTER=1 (set by .ci/run), which makes that a failure."""
    if not cluster_available():
        if cluster_required():
            pytest.fail("LLM_PROXY_REQUIRE_CLUSTER is set but redis-server or redis-cli is not installed")
        pytest.skip("Redis Cluster tests need redis-server and redis-cli")
    cluster = RedisCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> str:
    """The `redis+cluster://` URL of the flushed cluster."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(scope="session")
def _mock_process(tmp_path_factory):
    from tests.support.processes import MockProcess, start_all, stop_all

    process = start_all([MockProcess(workdir=tmp_path_factory.mktemp("mock-upstream"))])[0]
    yield process
    stop_all([process])


@pytest.fixture
def own_mock_process(tmp_path):
    """A mock upstream process of this test's own (default settings), for a test that gives it a
    quota: the session's mock keeps its quota window between tests."""
    from tests.support.processes import MockProcess, start_all, stop_all

    process = start_all([MockProcess(workdir=tmp_path / "mock")])[0]
    yield process
    stop_all([process])


@pytest.fixture
def mock_process(_mock_process):
    """The session's mock upstream in its own process (default settings), stats, requests and
    faults cleared: one start-up for every test that needs it, not one each."""
    _mock_process.clear()
    return _mock_process


@pytest.fixture
def mock_upstream():
    from proxy.mock_upstream import MockUpstream

    with MockUpstream() as mock:
        yield mock


class Recorder:
    """An observer keeping every request outcome, for assertions."""

    def __init__(self):
        self.outcomes = []

    def finished(self, outcome):
        self.outcomes.append(outcome)


@pytest.fixture
def start_proxy():
    """start_proxy(config, store=None) -> (ProxyServer, Recorder); stopped after the test."""
    from proxy.app import create_app
    from tests.support.servers import ProxyServer

    servers = []

    def start(config, store=None):
        recorder = Recorder()
        server = ProxyServer(create_app(config, store=store, observer=recorder)).start()
        servers.append(server)
        return server, recorder

    yield start
    for server in servers:
        server.stop()
