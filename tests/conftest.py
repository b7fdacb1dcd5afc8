from __future__ import annotations

import pytest

from tests.support.redis_cluster import RedisCluster, cluster_available, cluster_required
from tests.support.redis_server import RedisServer

# The tests that take 15 s and more (tests/TIMES.md), longest first, handed to the workers first: with `--dist
# load` the workers take tests in collection order, so none of these starts last and leaves one
# worker running alone at the end (with the collection's order, a 50 s fuzz test did).
SLOW_FIRST = (
    "tests/test_hostile_input.py::test_openapi_operations_never_answer_5xx_and_answer_as_documented",
    "tests/test_hostile_input.py::test_context_policy_over_random_conversations",
    "tests/test_redis_hiccups.py::",
    "tests/test_long_requests.py::",
    "tests/test_exactness.py::",
    "tests/test_budget_exactness.py::",
    "tests/test_agent_exactness.py::",
    "tests/test_window_exactness.py::",
    "tests/test_runtime_keys.py::test_the_cli_manages_keys_and_teams",
    "tests/test_budgets_e2e.py::test_usage_cli_table_and_json",
    "tests/test_budgets_e2e.py::test_admin_usage_by_answers_with_the_clis_rows",
    "tests/test_multiworker.py::test_two_workers_aggregate_metrics_and_share_limits",
    "tests/test_outage_fallback.py::test_fallback_leases_are_renewed_past_the_lease_ttl",
    "tests/test_invoice.py::test_the_ledger_books_exactly_what_the_invoice_charges",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, in SLOW_FIRST's order (the longest first), then the rest as collected:
    the same order in every worker, as pytest-xdist requires."""

    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)


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
