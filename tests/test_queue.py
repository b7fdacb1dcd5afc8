"""The bounded queue: a request a rate limit refuses waits up to `limits.max_wait_ms` for capacity.

Through uvicorn on a port, real Redis, the mock upstream (a slow stream holds a `max_parallel`
slot) and httpx or the OpenAI SDK: a waiter is served when the slot frees; with no wait, a wait
that cannot end in time, a full queue or a budget, the usual 429 comes at once; a client that
leaves is never admitted; turns go by priority class, then first come first served.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import redis

from proxy.request.queue import RANKS, priority_rank, queueing_teams
from tests.support.configs import KEYS, make_config
from tests.support.errors import Matching, openai_error
from tests.support.metrics import samples

# five words (max_tokens 5), 2.5 s and more: holds the slot while the test queues up to 4 waiters
# behind it (in 1.25 s, the holder had ended before the 4th waiter came, on loaded cores)
SLOW_STREAM = {"chunk_delay_s": 0.5}
PARALLEL = Matching(r"Rate limit reached for (key 'alice'|team 'platform') on parallel requests\. .*")


def queued(*, wait_ms: int, on: str = "key", redis_url: str, **team: object):
    """alice (and the team, `on="team"`) at max_parallel 1 and `max_wait_ms`; `team` adds team fields."""

    def patch(data: dict) -> None:
        data["store"] = {"redis_url": redis_url, "on_redis_error": "deny", "timeout_ms": 2000}
        limits = {"max_parallel": 1, "max_wait_ms": wait_ms}
        if on == "key":
            data["keys"]["alice"]["limits"] = limits
        else:
            data["teams"]["platform"]["limits"] = limits
        data["teams"]["platform"].update(team)
        data["keys"]["dave"] = {"team": "platform", "key": "sk-proxy-dave-4444", "priority": "high"}

    return patch


KEYS_ALL = {**KEYS, "dave": "sk-proxy-dave-4444"}


def chat(server, key: str = "alice", *, content: str = "hi", stream: bool = False, headers=None, timeout=10.0):
    body = {"model": "chat-model", "messages": [{"role": "user", "content": content}], "max_tokens": 5}
    if stream:
        with httpx.stream(
            "POST",
            server.base_url + "/chat/completions",
            json={**body, "stream": True},
            headers={"Authorization": f"Bearer {KEYS_ALL[key]}", **(headers or {})},
            timeout=timeout,
        ) as response:
            response.read()
            return response
    return httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS_ALL[key]}", **(headers or {})},
        timeout=timeout,
    )


class Background:
    """A request in a thread: its response (or exception), and when it came."""

    def __init__(self, send) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        self.thread.start()

    def _run(self, send) -> None:
        try:
            self.response = send()
        except BaseException as exc:  # handed to the test
            self.error = exc
        self.finished_at = time.monotonic()

    def result(self, timeout: float = 15) -> httpx.Response:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.response is not None, "the request did not finish"
        return self.response


def until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def hold_the_slot(server, mock, key: str = "alice") -> Background:
    """A slow stream admitted and running: the one parallel slot is taken until it ends."""
    mock.add_faults([SLOW_STREAM])
    holder = Background(lambda: chat(server, key, stream=True, content="holder"))
    until(lambda: len(mock.requests) == 1, what="the holder to reach the upstream")
    return holder


def waiting(server, team: str = "platform") -> int:
    return server.app.state.queue.depth(team)


def contents(mock) -> list[str]:
    return [request["body"]["messages"][0]["content"] for request in mock.requests]


# -- the pure part ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("own", "header", "rank"),
    [
        ("normal", None, RANKS["normal"]),
        ("high", None, RANKS["high"]),
        ("normal", "low", RANKS["low"]),  # a lower class: honoured
        ("high", " Normal ", RANKS["normal"]),
        ("normal", "high", RANKS["normal"]),  # a higher ask is ignored
        ("low", "high", RANKS["low"]),
    ],
)
def test_a_request_may_lower_its_class_never_raise_it(own, header, rank) -> None:
    headers = {} if header is None else {"x-proxy-priority": header}
    assert priority_rank(own, headers) == rank


# -- through the proxy ----------------------------------------------------------------------------
def test_a_waiter_is_served_when_the_slot_frees_and_its_wait_is_observed(mock_upstream, redis_url, start_proxy):
    server, recorder = start_proxy(make_config(mock_upstream.url, patch=queued(wait_ms=8000, redis_url=redis_url)))
    holder = hold_the_slot(server, mock_upstream)
    sent = time.monotonic()
    waiter = Background(lambda: chat(server, content="waiter"))
    until(lambda: waiting(server) == 1, what="the second request to wait")
    assert waiter.result().status_code == 200
    assert holder.result().status_code == 200
    assert waiter.finished_at >= holder.finished_at - 0.05  # admitted only once the holder's slot freed
    assert contents(mock_upstream) == ["holder", "waiter"]
    assert waiting(server) == 0
    server.wait_settled()
    found = samples(httpx.get(server.url + "/metrics", timeout=10).text)
    (labels, count), *_ = found["llm_proxy_queue_wait_seconds_count"]
    assert (labels, count) == ({"team": "platform"}, 1)
    (_, seconds), *_ = found["llm_proxy_queue_wait_seconds_sum"]
    assert 0.3 < seconds < waiter.finished_at - sent
    assert found["llm_proxy_queue_depth"] == [({"team": "platform"}, 0)]
    queued_ms = [o.queued_s for o in recorder.outcomes if o.status == 200 and o.queued_s]
    assert len(queued_ms) == 1


@pytest.mark.parametrize(
    ("on", "wait_ms", "teams"),
    [("key", 4000, {"platform"}), ("team", 4000, {"platform"}), ("key", 0, set()), ("team", 0, set())],
)
def test_the_teams_that_may_wait_are_those_with_max_wait_on_the_team_or_a_key(on, wait_ms, teams) -> None:
    patch = queued(wait_ms=wait_ms, on=on, redis_url="redis://127.0.0.1:1/0")
    assert queueing_teams(make_config("http://127.0.0.1:1/v1", patch=patch)) == teams


def test_a_team_that_may_wait_has_its_queue_series_at_zero_before_anyone_waits(mock_upstream, redis_url, start_proxy):
    """A series first scraped at its final value shows no increase to rate(): without these zeros
    the dashboard's queue panels missed the first waits after a start (the compose stack did)."""
    server, _ = start_proxy(make_config(mock_upstream.url, patch=queued(wait_ms=4000, redis_url=redis_url)))
    found = samples(httpx.get(server.url + "/metrics", timeout=10).text)
    assert found["llm_proxy_queue_wait_seconds_count"] == [({"team": "platform"}, 0)]
    assert found["llm_proxy_queue_wait_seconds_sum"] == [({"team": "platform"}, 0)]
    buckets = found["llm_proxy_queue_wait_seconds_bucket"]
    assert {labels["team"] for labels, _ in buckets} == {"platform"}  # research has no max_wait_ms
    assert len(buckets) > 1 and {value for _, value in buckets} == {0}
    assert found["llm_proxy_queue_depth"] == [({"team": "platform"}, 0)]


def test_without_max_wait_the_429_comes_at_once(mock_upstream, redis_url, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=queued(wait_ms=0, redis_url=redis_url)))
    holder = hold_the_slot(server, mock_upstream)
    sent = time.monotonic()
    refused = chat(server)
    assert time.monotonic() - sent < 0.5  # the holder still streams for 2 s and more
    assert refused.status_code == 429
    assert refused.json() == openai_error(PARALLEL, "parallel_requests", "rate_limit_exceeded")
    assert holder.result().status_code == 200


def test_a_wait_past_max_wait_ms_is_refused_at_once(mock_upstream, redis_url, start_proxy):
    """rpm 1: the next request fits in a minute, far past 3 s, so it does not wait at all."""

    def patch(data: dict) -> None:
        queued(wait_ms=3000, redis_url=redis_url)(data)
        data["keys"]["alice"]["limits"] = {"rpm": 1, "max_wait_ms": 3000}

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    assert chat(server).status_code == 200
    sent = time.monotonic()
    refused = chat(server)
    took = time.monotonic() - sent
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
    assert 50 <= int(refused.headers["retry-after"]) <= 60
    assert took < 0.5, f"refused after {took:.2f}s: it waited"  # well before max_wait_ms (3 s)


def test_a_full_queue_refuses_at_once(mock_upstream, redis_url, start_proxy):
    patch = queued(wait_ms=5000, on="team", redis_url=redis_url, max_queue=1)
    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    holder = hold_the_slot(server, mock_upstream)
    first = Background(lambda: chat(server, "bob", content="first waiter"))
    until(lambda: waiting(server) == 1, what="the first waiter")
    sent = time.monotonic()
    overflow = chat(server, "bob", content="overflow")
    assert time.monotonic() - sent < 0.5
    assert overflow.status_code == 429
    assert overflow.json() == openai_error(PARALLEL, "parallel_requests", "rate_limit_exceeded")
    assert first.result().status_code == 200 and holder.result().status_code == 200
    assert contents(mock_upstream) == ["holder", "first waiter"]


def test_a_client_that_leaves_the_queue_is_never_admitted(mock_upstream, redis_url, start_proxy):
    server, recorder = start_proxy(make_config(mock_upstream.url, patch=queued(wait_ms=5000, redis_url=redis_url)))
    holder = hold_the_slot(server, mock_upstream)
    with pytest.raises(httpx.ReadTimeout):
        chat(server, content="leaver", timeout=0.3)
    until(lambda: waiting(server) == 0, what="the leaver to leave the queue")
    assert holder.result().status_code == 200
    server.wait_settled()
    time.sleep(0.3)  # a turn the leaver might still get would come now, with the slot free
    assert contents(mock_upstream) == ["holder"]
    assert server.app.state.limiter.unsettled == 0
    store = redis.Redis.from_url(redis_url)
    assert store.zcard("llmrl:{platform}:k:alice:par") == 0  # no lease left behind
    gone = [o for o in recorder.outcomes if o.status == 499]
    assert len(gone) == 1 and gone[0].client_gone and gone[0].ticket is None
    assert chat(server).status_code == 200  # and the slot is free for the next


def test_turns_go_by_priority_class_then_first_come_first_served(mock_upstream, redis_url, start_proxy):
    """Arrival: low (bob asking for low), normal (bob), bob asking for high (ignored: a normal),
    high (dave, a high key). Turns: high, then the two normals in arrival order, then low."""
    patch = queued(wait_ms=8000, on="team", redis_url=redis_url)
    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    holder = hold_the_slot(server, mock_upstream, key="bob")
    arrivals = [
        ("bob", "low", {"x-proxy-priority": "low"}),
        ("bob", "normal 1", {}),
        ("bob", "normal 2 (asked high)", {"x-proxy-priority": "high"}),
        ("dave", "high", {}),
    ]
    waiters = []
    for count, (key, content, headers) in enumerate(arrivals, start=1):
        waiters.append(Background(lambda k=key, c=content, h=headers: chat(server, k, content=c, headers=h)))
        until(lambda n=count: waiting(server) == n, what=f"{content} to wait")
    assert all(w.result().status_code == 200 for w in waiters) and holder.result().status_code == 200
    assert contents(mock_upstream) == ["holder", "high", "normal 1", "normal 2 (asked high)", "low"]


def test_first_come_first_served_within_a_team(mock_upstream, redis_url, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=queued(wait_ms=8000, redis_url=redis_url)))
    holder = hold_the_slot(server, mock_upstream)
    waiters = []
    for count in range(1, 5):
        waiters.append(Background(lambda n=count: chat(server, content=f"waiter {n}")))
        until(lambda n=count: waiting(server) == n, what=f"waiter {count} to wait")
    assert all(w.result().status_code == 200 for w in waiters) and holder.result().status_code == 200
    assert contents(mock_upstream) == ["holder"] + [f"waiter {n}" for n in range(1, 5)]


def test_a_bad_priority_header_is_a_400(mock_upstream, redis_url, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=queued(wait_ms=1000, redis_url=redis_url)))
    refused = chat(server, headers={"x-proxy-priority": "urgent"})
    assert refused.status_code == 400
    assert refused.json() == {
        "error": {
            "message": "Invalid 'x-proxy-priority' header: expected one of high, normal or low.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_value",
        }
    }
    assert len(mock_upstream.requests) == 0
    served = chat(server, headers={"x-proxy-priority": "low"})
    assert served.status_code == 200
    assert "x-proxy-priority" not in mock_upstream.requests[0]["headers"]  # ours, not the provider's


def test_budgets_never_wait(mock_upstream, redis_url, start_proxy):
    """A chat here reserves about 8 µ$ and costs about as much: a 10 µ$ budget admits one."""

    def patch(data: dict) -> None:
        queued(wait_ms=5000, redis_url=redis_url)(data)
        data["keys"]["alice"]["daily_budget_usd"] = "0.00001"

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    assert chat(server).status_code == 200
    server.wait_settled()
    sent = time.monotonic()
    refused = chat(server)
    assert time.monotonic() - sent < 0.5
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert waiting(server) == 0


def test_a_held_upstream_is_waited_out_in_the_queue(mock_upstream, redis_url, start_proxy):
    """The provider answered 429 for 1.5 s: without a queue the next request is refused at once
    (tests/test_provider_holds.py); with max_wait_ms it waits for the hold's end and is served."""

    def patch(data: dict) -> None:
        queued(wait_ms=4000, redis_url=redis_url)(data)
        data["upstreams"]["mock"]["max_retries"] = 0
        data["keys"]["alice"]["limits"] = {"max_wait_ms": 4000}

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    mock_upstream.add_faults([{"status": 429, "retry_after_ms": "1500"}])
    client = openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=0, timeout=10)
    with pytest.raises(openai.InternalServerError):  # the provider's 429, not retried (max_retries 0)
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "a"}], max_tokens=5)
    held_at = time.monotonic()
    served = client.chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "b"}], max_tokens=5
    )
    assert served.choices[0].message.content
    assert time.monotonic() - held_at > 1.0  # it waited for the hold to end
    assert len(mock_upstream.requests) == 2 and mock_upstream.stats()["rate_limited"] == 0


def test_a_budget_fallback_still_serves_a_key_that_may_wait(mock_upstream, redis_url, start_proxy):
    """The budget refuses chat-model at once (no wait); its fallback (small-model, no price) fits."""

    def patch(data: dict) -> None:
        queued(wait_ms=5000, redis_url=redis_url)(data)
        data["keys"]["alice"]["daily_budget_usd"] = "0.00001"
        data["models"]["chat-model"]["on_budget_exhausted"] = {"fallback_model": "small-model"}

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
    assert chat(server).status_code == 200
    server.wait_settled()
    served = chat(server)
    assert served.status_code == 200 and served.headers["x-proxy-fallback"] == "budget"
    assert waiting(server) == 0
    server.wait_settled()
    assert [(o.status, o.queued_s) for o in recorder.outcomes] == [(200, 0.0), (200, 0.0)]  # neither waited


def test_a_full_upstream_quota_is_waited_for_in_the_queue(mock_upstream, redis_url, start_proxy):
    """The upstream's own quota (max_parallel 1) is taken by a slow stream: a caller that may wait
    queues on the model's target and is served when the stream ends; one that may not is refused."""

    def patch(data: dict) -> None:
        queued(wait_ms=8000, redis_url=redis_url)(data)
        data["keys"]["alice"]["limits"] = {"max_wait_ms": 8000}  # no key limit: only the quota refuses
        data["upstreams"]["mock"]["limits"] = {"max_parallel": 1}

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    holder = hold_the_slot(server, mock_upstream)
    refused = chat(server, "bob", content="bob")  # bob may not wait
    assert refused.status_code == 429 and "upstream quota of 'mock'" in refused.json()["error"]["message"]
    waiter = Background(lambda: chat(server, content="waiter"))
    until(lambda: waiting(server) == 1, what="the waiter to queue on the upstream quota")
    assert waiter.result().status_code == 200 and holder.result().status_code == 200
    assert waiter.finished_at >= holder.finished_at - 0.05  # admitted only once the quota's slot freed
    assert contents(mock_upstream) == ["holder", "waiter"]


async def test_a_team_refused_for_its_share_of_one_target_does_not_hold_up_its_waiters_for_another() -> None:
    """A waiter refused for its team's fair share of target u1's quota (the refusal as admission
    builds it) holds up its team's later waiters for u1, not its waiter for u2, which has room."""
    import asyncio

    from proxy.config import Target
    from proxy.limits.types import Decision
    from proxy.request.admit import upstream_quota_refusal
    from proxy.request.queue import Entry, WaitQueue, waiter_scopes

    u1, u2 = Target(upstream="u1", model="m"), Target(upstream="u2", model="m")
    share = Decision(admitted=False, reason="share", scope="upstream", retry_after_ms=100, target=0)
    queue = WaitQueue()

    def entry(target: Target) -> Entry:
        return Entry("A", 1, 2.0, 100, 1.0, waiter_scopes("k", "A", None, [target]))

    async def refused_for_its_share() -> str:
        raise upstream_quota_refusal(share, [u1], {}, "A")

    async def fits() -> str:
        return "admitted"

    async def release(_: str) -> None:
        pass

    started = time.monotonic()
    first = asyncio.ensure_future(queue.admit(entry(u1), refused_for_its_share, release))
    await asyncio.sleep(0.05)
    behind = asyncio.ensure_future(queue.admit(entry(u1), fits, release))
    other = asyncio.ensure_future(queue.admit(entry(u2), fits, release))
    assert await other == "admitted"
    assert time.monotonic() - started < 1.0  # not at the first waiter's 2 s deadline
    assert not behind.done()  # the same target's waiter stays behind the first
    first.cancel()
    assert await behind == "admitted"
