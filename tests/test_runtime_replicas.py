"""Runtime keys across three real `llm-proxy serve` replicas on one real Redis: a key created on
one replica works on the others within a second; a revoked key is refused by every replica from
the moment its revocation returns (the fence in the admit script, not the caches' poll), which the
mock's request count and the ledger confirm; a rotated-out key stops on every replica when its
grace ends. On one Redis and on a Redis Cluster."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from proxy.request.authenticate import sha256_hex
from tests.support.configs import ADMIN_KEY, config_dict, exact_store
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

REPLICAS = 3
VISIBLE_WITHIN_S = 1.0  # the promise: a change reaches every replica within this
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
CLIENTS = 12


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    process = MockProcess(workdir=tmp_path_factory.mktemp("mock")).start().wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module", params=["redis", "cluster"])
def store_url(request) -> str:
    """The replicas' shared store: one Redis, or a Redis Cluster (the fence shares the team's slot),
    flushed once for the module's tests on it."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        server.start()
        server.flush()
        return str(server.url)
    cluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    return str(cluster.url)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, store_url, mock):
    """One set of replicas per store for every test of the module (each start costs ~0.6 s of CPU):
    the tests create runtime keys and teams of their own names, so none sees another's."""
    data = exact_store(config_dict(mock.base_url, redis_url=store_url))
    data["shutdown_grace_s"] = 1
    data["admin_keys"] = {"ops": {"key_sha256": sha256_hex("sk-admin-ops-7777")}}
    processes = start_proxies(write_config(tmp_path_factory.mktemp("replicas") / "config.yaml", data), REPLICAS)
    yield [p.url for p in processes]
    stop_all(processes)
    for process in processes:
        assert "Traceback" not in process.output(), process.output()


@pytest.fixture
def urls(replicas, mock):
    mock.clear()
    return replicas


@pytest.fixture(scope="module")
def http():
    """One client for the module's calls: a new client per call costs ~40 ms of CPU (it loads the
    CA bundle), so `seconds_until` polled every 100-300 ms on loaded cores instead of every 20 ms."""
    with httpx.Client(timeout=10) as client:
        yield client


def admin(http: httpx.Client, url: str, method: str, path: str, **kwargs) -> httpx.Response:
    return http.request(method, url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)


def chat(http: httpx.Client, url: str, key: str) -> int:
    return http.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}).status_code


def research_requests(http: httpx.Client, url: str) -> int:
    """Requests the ledger booked today for team research."""
    return int(admin(http, url, "GET", "/admin/usage").json()["teams"]["research"]["requests"])


def seconds_until(http: httpx.Client, status: int, url: str, key: str, limit_s: float = 5.0) -> float:
    """How long after now `url` first answers `key` with `status` (polled every 20 ms)."""
    started = time.monotonic()
    while chat(http, url, key) != status:
        if time.monotonic() - started > limit_s:
            return float("inf")
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_key_created_on_one_replica_works_on_the_others_within_a_second(http, urls):
    created = admin(http, urls[0], "POST", "/admin/keys", json={"name": "fresh", "team": "platform"})
    assert created.status_code == 201, created.text
    secret = created.json()["key"]
    waits = [seconds_until(http, 200, url, secret) for url in urls[1:]]
    assert max(waits) < VISIBLE_WITHIN_S, waits
    listing = admin(http, urls[2], "GET", "/admin/keys").json()["keys"]
    assert listing["fresh"]["source"] == "api" and listing["alice"]["source"] == "config"


def test_a_revoked_key_is_refused_everywhere_and_nothing_is_admitted_after(http, urls, mock):
    secret = admin(http, urls[0], "POST", "/admin/keys", json={"name": "doomed", "team": "research"}).json()["key"]
    for url in urls:
        assert seconds_until(http, 200, url, secret) < VISIBLE_WITHIN_S
    mock.clear()
    booked_before = research_requests(http, urls[0])
    calls: list[tuple[float, int]] = []  # (sent, status) by monotonic time
    revoked_at: list[float] = []

    async def client(http: httpx.AsyncClient, index: int) -> None:
        n = index
        while not revoked_at or time.monotonic() < revoked_at[0] + VISIBLE_WITHIN_S + 0.5:
            sent = time.monotonic()
            reply = await http.post(
                urls[n % REPLICAS] + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {secret}"}
            )
            calls.append((sent, reply.status_code))
            n += 1

    async def revoker(http: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.5)
        reply = await http.delete(urls[1] + "/admin/keys/doomed", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert reply.status_code == 200, reply.text
        revoked_at.append(time.monotonic())

    async def run() -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            await asyncio.gather(revoker(http), *(client(http, i) for i in range(CLIENTS)))

    asyncio.run(run())
    after = [status for sent, status in calls if sent >= revoked_at[0]]
    before = [status for sent, status in calls if sent < revoked_at[0]]
    assert after and set(after) == {401}, sorted(set(after))  # refused at once, by every replica
    assert 200 in before
    admitted = sum(1 for _, status in calls if status == 200)
    assert mock.stats()["requests"] == admitted  # nothing reached the upstream that the client did not get
    deadline = time.monotonic() + 2  # the last responses settle just after they are sent
    while research_requests(http, urls[2]) - booked_before != admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert research_requests(http, urls[2]) - booked_before == admitted  # the ledger agrees


def test_a_rotated_key_works_everywhere_until_its_grace_ends(http, urls):
    old = admin(http, urls[0], "POST", "/admin/keys", json={"name": "svc", "team": "platform"}).json()["key"]
    # the grace outlasts the checks below, which may take up to VISIBLE_WITHIN_S per replica (a 2 s
    # grace ended mid-loop on a loaded machine, and the old key's rightful 401 failed the test)
    grace_s = int(REPLICAS * VISIBLE_WITHIN_S) + 1
    rotated = admin(http, urls[1], "POST", "/admin/keys/svc/rotate", json={"grace_s": grace_s})
    assert rotated.status_code == 200, rotated.text
    ends = time.monotonic() + grace_s
    new = rotated.json()["key"]
    for url in urls:
        assert seconds_until(http, 200, url, new) < VISIBLE_WITHIN_S
        assert chat(http, url, old) == 200  # still within its grace
    time.sleep(max(0.0, ends - time.monotonic()))
    for url in urls:
        assert chat(http, url, old) == 401  # the fence ends it by the store's clock, on every replica
        assert chat(http, url, new) == 200


def test_an_unscoped_admin_key_from_config_is_named_in_the_audit(http, urls):
    reply = httpx.post(
        urls[2] + "/admin/teams",
        json={"name": "lab"},
        headers={"Authorization": "Bearer sk-admin-ops-7777"},
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    records = admin(http, urls[0], "GET", "/admin/audit").json()["data"]
    assert [(r["admin"], r["action"]) for r in records if r["target"] == "lab"] == [("ops", "create")]


def test_a_runtime_keys_wait_and_its_teams_queue_bound_apply_on_every_replica(http, urls, mock):
    """Created on one replica: a team of one parallel slot holding one waiter per replica, and a key
    that may wait. Its request on a third replica, refused while a slow stream of the team holds the
    slot from a second one, waits and is served when the slot frees; a second waiter there is
    refused at once (`max_queue` 1)."""
    assert admin(
        http, urls[0], "POST", "/admin/teams", json={"name": "q", "limits": {"max_parallel": 1}, "max_queue": 1}
    ).status_code == 201  # fmt: skip
    keys = {}
    for name, limits in (("holder", {}), ("waiter", {"max_wait_ms": 8000})):
        reply = admin(http, urls[0], "POST", "/admin/keys", json={"name": name, "team": "q", "limits": limits})
        assert reply.status_code == 201, reply.text
        keys[name] = reply.json()["key"]
    for url in urls[1:]:
        assert seconds_until(http, 200, url, keys["waiter"]) < VISIBLE_WITHIN_S
    assert admin(http, urls[2], "GET", "/admin/keys/waiter").json()["limits"]["max_wait_ms"] == 8000
    mock.clear()
    httpx.post(mock.url + "/_mock/faults", json=[{"chunk_delay_s": 0.25}]).raise_for_status()  # 2.5 s of stream
    stream = {**CHAT, "stream": True}
    holder = threading.Thread(
        target=httpx.post,
        args=(urls[1] + "/v1/chat/completions",),
        kwargs={"json": stream, "headers": {"Authorization": f"Bearer {keys['holder']}"}, "timeout": 10},
    )
    holder.start()
    deadline = time.monotonic() + 5
    while mock.stats()["requests"] < 1:
        assert time.monotonic() < deadline, "the holder did not reach the upstream"
        time.sleep(0.02)
    waited: list[int] = []
    waiter = threading.Thread(target=lambda: waited.append(chat(httpx.Client(timeout=15), urls[2], keys["waiter"])))
    waiter.start()
    deadline = time.monotonic() + 2
    while 'llm_proxy_queue_depth{team="q"} 1.0' not in http.get(urls[2] + "/metrics").text:
        assert time.monotonic() < deadline, "the waiter did not wait"
        time.sleep(0.02)
    reply = http.post(
        urls[2] + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {keys['waiter']}"}
    )
    assert (reply.status_code, reply.json()["error"]["type"]) == (429, "parallel_requests")  # the queue is full
    holder.join(15)
    waiter.join(15)
    assert waited == [200]
    assert mock.stats()["requests"] == 2  # the holder's and the waiter's, nothing else
    metrics = http.get(urls[2] + "/metrics").text
    assert 'llm_proxy_queue_wait_seconds_count{team="q"} 1.0' in metrics
