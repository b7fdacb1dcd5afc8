"""The exactness contract across replicas: three real `llm-proxy serve` processes on one real Redis
(and again on a real 3-master Redis Cluster), hammered by many concurrent clients.

Over any run of length T starting from full buckets, across all replicas together:
admitted requests <= rpm_burst + rpm*T/60, tokens charged <= tpm_burst + tpm*T/60, and never more
than max_parallel requests in flight. T is measured by the client from just before the first
request is sent to just after the last response arrives, which contains the servers' window, so
the bounds are asserted with no slack. A lower bound proves the limiter does not pass by refusing
everything, derived from what was actually sent and when, never from how fast this machine is: a
bucket starts full, so the first refusal comes only after its capacity was admitted (at least that
many 200s were sent before the first 429 came back); a parallel cap refuses only while `cap`
admitted requests are in flight. That the bucket refills at its rate is proven on a pinned clock
by tests/test_store_conformance.py, where no scheduling delay can blur it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from proxy.limits.limiter import reserved_tokens
from proxy.request.call import parse_call
from tests.support.configs import KEYS, config_dict, exact_store
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

# a client forgets an idle connection before the server closes it (uvicorn: 5 s idle): a request on a
# connection the server closes at that moment fails with a ReadError that says nothing of the proxy
KEEPALIVE_S = 2

REPLICAS = 3
CLIENTS = 100
HAMMER_S = 1.5  # each of 100 clients sends back to back: ~2,000 requests, nearly all refused
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
STREAM_CLIENTS = 30
STREAM_S = 1.5
STREAM_CHUNKS, CHUNK_DELAY_S = 10, 0.05
REFUSED_PAUSE_S = 0.01  # a refused stream client's pause, so 30 of them don't starve the event loop


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    process = MockProcess(workdir=tmp_path_factory.mktemp("mock")).start().wait_ready()
    yield process
    process.stop()


@pytest.fixture
def slow_mock(tmp_path):
    process = MockProcess(chunk_delay_s=CHUNK_DELAY_S, chunks=STREAM_CHUNKS, workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


@pytest.fixture(params=["redis", "cluster"])
def store_url(request) -> str:
    """The replicas' shared store: one Redis (`redis://`), or a Redis Cluster (`redis+cluster://`)."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")


def redis_client(url: str) -> aioredis.Redis | aioredis.RedisCluster:
    if url.startswith("redis+cluster://"):
        return aioredis.RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"), socket_timeout=2)
    return aioredis.Redis.from_url(url, socket_timeout=2)


@pytest.fixture
def replicas(tmp_path, store_url):
    """replicas(upstream, patch) -> the URLs of REPLICAS proxy processes sharing `store_url`."""
    started = []

    def start(upstream: MockProcess, patch) -> list[str]:
        data = exact_store(config_dict(upstream.base_url, redis_url=store_url))
        data["shutdown_grace_s"] = 1
        patch(data)
        processes = start_proxies(write_config(tmp_path / "config.yaml", data), REPLICAS)
        started.extend(processes)
        return [p.url for p in processes]

    yield start
    stop_all(started)
    for process in started:
        assert "Traceback" not in process.output(), process.output()


@dataclass
class Run:
    elapsed_s: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)  # (type, code) of each 429
    tokens: int = 0  # usage.total_tokens summed over the 200s
    most_tokens: int = 0  # the largest usage.total_tokens of one request
    calls: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, answered, status)

    @property
    def admitted(self) -> int:
        return self.statuses[200]


def allowance(capacity: int, per_minute: int, elapsed_s: float) -> int:
    """What a full bucket may give out over `elapsed_s`: capacity + rate * T, floored."""
    return capacity + math.floor(per_minute * elapsed_s / 60)


def pools(urls: list[str]) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=KEEPALIVE_S)
    return [httpx.AsyncClient(base_url=url, limits=limits, timeout=10) for url in urls]


async def timed(clients: list[httpx.AsyncClient], worker, count: int) -> float:
    """Run `count` workers, worker(i, client, go), after each has warmed its connection;
    returns the wall time from the start signal to the last worker's end."""
    go = asyncio.Event()
    ready = 0

    async def warm_then_work(i: int) -> None:
        nonlocal ready
        client = clients[i % len(clients)]
        (await client.get("/healthz")).raise_for_status()
        ready += 1
        await go.wait()
        await worker(i, client)

    tasks = [asyncio.create_task(warm_then_work(i)) for i in range(count)]
    while ready < count:
        await asyncio.sleep(0.01)
        for task in tasks:
            if task.done():
                task.result()  # a warm-up failure surfaces here
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


async def hammer(urls: list[str], keys: list[str], body: dict, seconds: float = HAMMER_S) -> Run:
    """CLIENTS clients, round-robin over the replicas (and `keys`), each sending back to back."""
    run = Run()
    clients = pools(urls)

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {KEYS[keys[i % len(keys)]]}"}
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            run.calls.append((sent, time.perf_counter(), response.status_code))
            run.statuses[response.status_code] += 1
            if response.status_code == 200:
                used = response.json()["usage"]["total_tokens"]
                run.tokens += used
                run.most_tokens = max(run.most_tokens, used)
            elif response.status_code == 429:
                error = response.json()["error"]
                run.refusals[(error["type"], error["code"])] += 1

    try:
        run.elapsed_s = await timed(clients, worker, CLIENTS)
    finally:
        for client in clients:
            await client.aclose()
    return run


def assert_only_refusals_of(run: Run, limit_type: str) -> None:
    assert set(run.statuses) <= {200, 429}, run.statuses
    # a loaded machine may never send past the allowance: then nothing is refused, and rightly so
    assert set(run.refusals) <= {(limit_type, "rate_limit_exceeded")}, run.refusals
    assert run.refusals[(limit_type, "rate_limit_exceeded")] == run.statuses[429]


def admitted_before_first_refusal(calls: list[tuple[float, float, int]]) -> int | None:
    """200s sent before the first 429 was answered: at least what the server admitted before it
    first refused (None without refusals)."""
    refused = [answered for _, answered, status in calls if status == 429]
    if not refused:
        return None
    first = min(refused)
    return sum(1 for sent, _, status in calls if status == 200 and sent < first)


def assert_no_refusal_before(run: Run | StreamRun, admitted: int) -> None:
    before = admitted_before_first_refusal(run.calls)
    assert before is None or before >= admitted, f"the first refusal came after only {before} admissions"


def report(name: str, measured: int, bound: int, run: Run) -> None:
    print(
        f"\n{name}: {measured} of {bound} allowed over T={run.elapsed_s:.3f}s "
        f"({measured / bound:.1%}); statuses {dict(run.statuses)}"
    )


def test_rpm_is_exact_across_replicas(mock, replicas):
    rpm, burst = 600, 20

    def patch(data):
        data["keys"]["alice"]["limits"] = {"rpm": rpm, "rpm_burst": burst}

    urls = replicas(mock, patch)
    run = asyncio.run(hammer(urls, ["alice"], CHAT))
    bound = allowance(burst, rpm, run.elapsed_s)
    report("rpm", run.admitted, bound, run)
    assert run.admitted <= bound
    assert_no_refusal_before(run, burst)
    assert_only_refusals_of(run, "requests")


def test_tpm_is_exact_across_replicas(mock, replicas):
    tpm, burst = 60_000, 2_000

    def patch(data):
        data["keys"]["alice"]["limits"] = {"tpm": tpm, "tpm_burst": burst}

    urls = replicas(mock, patch)
    mock.clear()
    run = asyncio.run(hammer(urls, ["alice"], {**CHAT, "max_tokens": 50}))
    stats = mock.stats()
    charged = stats["prompt_tokens"] + stats["completion_tokens"]
    assert charged == run.tokens, "the upstream reported usage the clients did not see"
    assert stats["requests"] == run.admitted
    bound = allowance(burst, tpm, run.elapsed_s)
    report("tpm (tokens charged)", charged, bound, run)
    assert charged <= bound
    # each admitted request takes at most `most` tokens from the full bucket (its reservation, or
    # the usage settled if larger), and a refusal needs fewer than one reservation left
    body = {**CHAT, "max_tokens": 50}
    most = max(reserved_tokens(parse_call("chat", body).prompt_tokens, 50), run.most_tokens)
    assert_no_refusal_before(run, burst // most)
    assert_only_refusals_of(run, "tokens")


# on one Redis only: a team and its keys share one slot, so on a cluster this is the rpm case again
# (the conformance suite runs the team scope on the cluster); it would add ~10 s
@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_team_rpm_is_shared_by_its_keys_across_replicas(mock, replicas):
    rpm, burst = 600, 20

    def patch(data):
        data["teams"]["platform"]["limits"] = {"rpm": rpm, "rpm_burst": burst}

    urls = replicas(mock, patch)
    run = asyncio.run(hammer(urls, ["alice", "bob"], CHAT))  # 100 clients: all 6 (replica, key) pairs
    bound = allowance(burst, rpm, run.elapsed_s)
    report("team rpm", run.admitted, bound, run)
    assert run.admitted <= bound
    assert_no_refusal_before(run, burst)
    assert_only_refusals_of(run, "requests")


@dataclass
class StreamRun:
    elapsed_s: float = 0.0
    windows: list[tuple[float, float]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    max_leases: int = 0
    lease_polls: int = 0
    calls: list[tuple[float, float, int]] = field(default_factory=list)  # (sent, headers, status)


def most_overlapping(windows: list[tuple[float, float]]) -> int:
    """The largest number of [start, end] windows open at one instant (touching ends don't overlap)."""
    events = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    open_now = peak = 0
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak


async def stream_once(client: httpx.AsyncClient, headers: dict, run: StreamRun) -> None:
    """One streamed chat; an admitted stream's window runs from its headers to its last word.

    The proxy admits before it sends headers and releases the slot after the last byte, so
    [headers received, last word received] lies inside [admit, release]: the last word is sent one
    chunk delay before the stream's end, which covers the way back to this client."""
    sent = time.perf_counter()
    async with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 50, "stream": True}, headers=headers
    ) as response:
        start = time.perf_counter()
        run.calls.append((sent, start, response.status_code))
        run.statuses[response.status_code] += 1
        if response.status_code != 200:
            body = await response.aread()
            if response.status_code == 429:
                error = orjson.loads(body)["error"]
                run.refusals[(error["type"], error["code"])] += 1
            await asyncio.sleep(REFUSED_PAUSE_S)
            return
        last_word = None
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                choices = orjson.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    last_word = time.perf_counter()
        assert last_word is not None, "an admitted stream carried no content"
        run.windows.append((start, last_word))


async def stream_hammer(urls: list[str], lease_key: str, redis_url: str) -> StreamRun:
    run = StreamRun()
    clients = pools(urls)
    store = redis_client(redis_url)
    polling = True

    async def poll_leases() -> None:
        while polling:
            run.max_leases = max(run.max_leases, await store.zcard(lease_key))
            run.lease_polls += 1
            await asyncio.sleep(0.002)

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        headers = {"Authorization": f"Bearer {KEYS['alice']}"}
        stop_at = time.perf_counter() + STREAM_S
        while time.perf_counter() < stop_at:
            await stream_once(client, headers, run)

    poller = asyncio.create_task(poll_leases())
    try:
        run.elapsed_s = await timed(clients, worker, STREAM_CLIENTS)
    finally:
        polling = False
        await poller
        for client in clients:
            await client.aclose()
    deadline = time.monotonic() + 3
    while await store.zcard(lease_key):  # every slot is released once the streams have ended
        assert time.monotonic() < deadline, "parallel slots leaked after every stream ended"
        await asyncio.sleep(0.02)
    await store.aclose()
    return run


def test_max_parallel_holds_for_slow_streams_across_replicas(slow_mock, replicas, store_url):
    cap = 5

    def patch(data):
        data["keys"]["alice"]["limits"] = {"max_parallel": cap}

    urls = replicas(slow_mock, patch)
    run = asyncio.run(stream_hammer(urls, "llmrl:{platform}:k:alice:par", store_url))
    overlap = most_overlapping(run.windows)
    print(
        f"\nmax_parallel: {len(run.windows)} streams over T={run.elapsed_s:.3f}s, at most {overlap} "
        f"overlapping at the client, at most {run.max_leases} leases in Redis ({run.lease_polls} polls); "
        f"statuses {dict(run.statuses)}"
    )
    assert overlap <= cap
    assert run.max_leases <= cap
    assert_no_refusal_before(run, cap)  # refused only while `cap` admitted streams were in flight
    assert set(run.statuses) <= {200, 429}, run.statuses
    assert set(run.refusals) <= {("parallel_requests", "rate_limit_exceeded")}, run.refusals
