"""Provider holds shared by the replicas through the store (`proxy.request.shared_holds`).

With pinned clocks: replicas (a `ProviderHolds` and its `HoldSharing` each) on one store, each with
a monotonic clock of its own; a hold one makes reaches the others at their next poll, for what is
left of it by the store's clock. A store that fails costs nothing but the sharing (logged once,
counted). The in-process store takes the same path. End to end: three `llm-proxy serve` replicas
on one real Redis, one mock upstream with a quota of one request a minute (or one 429): once one
replica has learnt the window is empty, every replica refuses without sending the mock anything.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
import redis

from proxy.config import Target
from proxy.errors import StoreError
from proxy.limits.memory_store import MemoryStore
from proxy.request.holds import ProviderHolds
from proxy.request.shared_holds import HoldSharing
from tests.support.configs import KEYS, config_dict, exact_store, make_config
from tests.support.errors import Matching, openai_error
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

T0_US = 1_800_000_000 * 1_000_000
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
HEADERS = {"Authorization": f"Bearer {KEYS['alice']}"}
MOCK, BACKUP = Target(upstream="mock", model="gpt-4o-mini"), Target(upstream="backup", model="gpt-4o")


class PinnedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Replica:
    """One replica's holds, on a monotonic clock of its own, sharing through `store`."""

    def __init__(self, store, monotonic_s: float, caps: dict[str, float] | None = None) -> None:
        self.clock = PinnedClock(monotonic_s)
        self.holds = ProviderHolds(clock=self.clock, wall=lambda: T0_US / 1e6)
        self.errors: list[str] = []
        caps = {"mock": 60.0, "backup": 60.0} if caps is None else caps
        self.sharing = HoldSharing(store, self.holds, lambda u: caps.get(u, 0.0), on_store_error=self.errors.append)

    async def answered(self, target: Target, status: int, headers: dict[str, str]) -> None:
        """An answer from `target`'s upstream, and the write it may start finished."""
        self.holds.follow(target, "openai", 60, status, headers)
        await asyncio.gather(*self.sharing._writes)


@pytest.fixture
def store_clock() -> list[int]:
    return [T0_US]


@pytest.fixture
def store(store_clock) -> MemoryStore:
    return MemoryStore(clock_us=lambda: store_clock[0])


async def test_a_hold_reaches_the_other_replicas_for_what_is_left_of_it_by_the_store_clock(store, store_clock):
    first, second, third = Replica(store, 100.0), Replica(store, 5_000.0), Replica(store, 7.0)
    await first.answered(MOCK, 429, {"retry-after": "5"})
    assert first.holds.remaining(MOCK) == 5
    assert second.holds.remaining(MOCK) == third.holds.remaining(MOCK) == 0  # not before their poll
    store_clock[0] += 1_500_000  # their polls come 1.5 s later by the store's clock
    await second.sharing.refresh()
    await third.sharing.refresh()
    assert second.holds.remaining(MOCK) == third.holds.remaining(MOCK) == pytest.approx(3.5)
    assert second.holds.remaining(BACKUP) == 0
    refusal = second.holds.refusal([MOCK])
    assert refusal.type == "requests" and refusal.headers["retry-after-ms"] == "3500"
    second.clock.now += 3.5
    assert second.holds.remaining(MOCK) == 0


async def test_a_shared_hold_never_shortens_one_and_is_never_written_back(store):
    first, second = Replica(store, 0.0), Replica(store, 0.0)
    first.sharing.store = _Down()  # its write is lost: only it holds, for 30 s
    await first.answered(MOCK, 429, {"retry-after": "30"})
    first.sharing.store = store
    await second.answered(MOCK, 200, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2s"})
    await first.sharing.refresh()
    assert first.holds.remaining(MOCK) == 30  # its own, longer than the shared 2 s
    assert first.holds.refusal([MOCK]).type == "requests"
    await first.answered(BACKUP, 200, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2s"})
    await second.answered(BACKUP, 429, {"retry-after": "20"})
    await first.sharing.refresh()
    assert first.holds.remaining(BACKUP) == 20  # the longer one, shared: its kind too
    assert first.holds.refusal([BACKUP]).type == "requests"
    writes: list[tuple] = []
    first.sharing.store = second.sharing.store = _Recording(store, writes)
    for replica in (first, second):
        await replica.sharing.refresh()
    assert writes == []  # adopting a hold writes nothing


async def test_a_replica_caps_a_shared_hold_by_its_own_max_hold_s_and_ignores_what_it_does_not_follow(store):
    first = Replica(store, 0.0, caps={"mock": 600.0, "backup": 600.0})
    capped, off = Replica(store, 0.0, caps={"mock": 2.0, "backup": 0.0}), Replica(store, 0.0, caps={})
    first.holds.follow(BACKUP, "openai", 600, 429, {"retry-after": "300"})
    await first.answered(MOCK, 429, {"retry-after": "300"})
    for replica in (capped, off):
        await replica.sharing.refresh()
    assert (capped.holds.remaining(MOCK), capped.holds.remaining(BACKUP)) == (2, 0)
    assert (off.holds.remaining(MOCK), off.holds.remaining(BACKUP)) == (0, 0)


class _Recording:
    def __init__(self, store, writes: list) -> None:
        self.store, self.writes = store, writes

    async def hold(self, *args):
        self.writes.append(args)
        return await self.store.hold(*args)

    async def holds(self):
        return await self.store.holds()


class _Down:
    async def hold(self, *args):
        raise StoreError("hold failed: ConnectionError()")

    async def holds(self):
        raise StoreError("holds failed: ConnectionError()")


async def eventually(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def test_a_store_that_fails_leaves_each_replica_its_own_holds_logged_once_and_counted(caplog):
    replica = Replica(_Down(), 0.0)
    replica.sharing.poll_interval_s = 0.01
    with caplog.at_level(logging.INFO, logger="proxy.holds"):
        await replica.answered(MOCK, 429, {"retry-after": "5"})
        assert replica.holds.remaining(MOCK) == 5  # held here all the same
        replica.sharing.start()
        await eventually(lambda: replica.errors.count("holds") >= 3)
        replica.sharing.store = MemoryStore()  # it answers again
        await eventually(lambda: len(caplog.records) >= 2)
        await replica.sharing.stop()
    assert replica.errors[0] == "hold" and set(replica.errors) == {"hold", "holds"}
    assert [r.getMessage() for r in caplog.records] == [
        "provider holds not shared (hold failed: ConnectionError()); each replica keeps its own meanwhile",
        "provider holds shared again",
    ]
    assert replica.holds.remaining(MOCK) == 5


class _Broken:
    async def hold(self, *args):
        raise RuntimeError("a driver surprise")

    async def holds(self):
        raise RuntimeError("a driver surprise")


async def test_an_unexpected_error_is_logged_once_with_its_traceback_and_counted(caplog):
    replica = Replica(_Broken(), 0.0)
    replica.sharing.poll_interval_s = 0.01
    with caplog.at_level(logging.INFO, logger="proxy.holds"):
        replica.sharing.start()
        await eventually(lambda: replica.errors.count("holds") >= 5)
        await replica.sharing.stop()
    assert [(r.levelname, r.exc_info is not None) for r in caplog.records] == [("ERROR", True)]


def test_the_in_process_store_takes_the_same_path(mock_upstream, start_proxy):
    """One process, no Redis: its holds still go through the store's scripts and back."""
    store = MemoryStore()
    server, _ = start_proxy(make_config(mock_upstream.url), store=store)
    mock_upstream.add_faults([{"status": 429, "retry_after_ms": "30000"}])
    answer = httpx.post(server.base_url + "/chat/completions", json=CHAT, headers=HEADERS, timeout=10)
    assert answer.status_code == 429  # refused after the 429 its retries met: the target is held
    server.stop()  # the store is the server thread's: read it once that has ended
    shared = asyncio.run(store.holds())
    assert [(h.upstream, h.model, h.kind) for h in shared.holds] == [("mock", "gpt-4o-mini", "requests")]
    assert 29_000 < shared.holds[0].end_ms - shared.now_ms <= 30_000


# -- end to end: three replicas, one Redis, one mock upstream -------------------------------------
REPLICAS = 3
HELD = Matching(
    r"Rate limit reached at the provider: upstream 'mock' has no requests left for 'gpt-4o-mini' until its "
    r"limit resets, so the proxy does not send it this request\. Please try again in [\d.]+m?s\."
)
SPREAD_WAIT_S = 1.0  # four polls: a hold in the store has reached every replica by then


@pytest.fixture
def mock(tmp_path):
    process = MockProcess(workdir=tmp_path).start().wait_ready()
    yield process
    stop_all([process])


@pytest.fixture
def replicas(mock, redis_url, tmp_path):
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data["shutdown_grace_s"] = 1
    data["upstreams"]["mock"]["max_retries"] = 0  # one target, no proxy-side quota
    started = start_proxies(write_config(tmp_path / "config.yaml", data), REPLICAS)
    yield started
    stop_all(started)
    for process in started:
        assert "Traceback" not in process.output(), process.output()


def chat(replica) -> httpx.Response:
    return httpx.post(replica.url + "/v1/chat/completions", json=CHAT, headers=HEADERS, timeout=10)


def wait_until_stored(redis_url: str) -> float:
    """Seconds until the mock target's hold is in the store (its writer does not wait for it)."""
    client = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    try:
        while not client.hexists("llmrl:{holds}", "mock\tgpt-4o-mini"):
            assert time.monotonic() - started < 10, "the hold never reached the store"
            time.sleep(0.005)
    finally:
        client.close()
    return time.monotonic() - started


def assert_held(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.json() == openai_error(HELD, "requests", "rate_limit_exceeded")
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    assert 0 < int(answer.headers["retry-after-ms"]) <= 60_000


@pytest.mark.slow
@pytest.mark.parametrize("how", ["quota", "429"])
def test_once_one_replica_holds_the_target_no_replica_sends_it_more(mock, replicas, redis_url, how):
    """`quota`: the mock allows one request a minute, and its answer to that one already shows
    none left, so the replica that sent it holds the target from then. `429`: the mock's 429 (a
    fault, retry-after 30 s) to a second request via replica 0 makes the hold."""
    if how == "quota":
        httpx.post(mock.url + "/_mock/quota", json={"requests": 1, "window_s": 60}).raise_for_status()
    first = chat(replicas[0])
    assert first.status_code == 200, first.text
    if how == "429":
        httpx.post(mock.url + "/_mock/faults", json=[{"status": 429, "retry_after_ms": "30000"}]).raise_for_status()
        refused = chat(replicas[0])  # with no retry left, the mock's 429 is the upstream's error
        assert (refused.status_code, refused.json()["error"]["code"]) == (502, "upstream_error")
    sent = mock.stats()["requests"]
    assert sent == (1 if how == "quota" else 2)
    stored_s = wait_until_stored(redis_url)
    time.sleep(SPREAD_WAIT_S)
    answers = [chat(replica) for replica in (replicas[1], replicas[2], replicas[1], replicas[2], replicas[0])]
    for answer in answers:
        assert_held(answer)
    assert mock.stats()["requests"] == sent  # none of them reached the mock
    assert mock.stats()["rate_limited"] == 0  # the quota's own 429s (a fault's are not counted)
    print(f"\nthe hold was in the store {stored_s * 1000:.0f} ms after the answer that made it")
