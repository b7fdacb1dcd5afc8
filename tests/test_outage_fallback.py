"""The `allow`-mode fallback limiter through the real proxy while Redis is down: each limit is the
configured one divided by `store.replicas`, exactly, and budgets start from the spend this replica
last saw in Redis instead of from zero.

Real proxy on a port (uvicorn), the mock upstream, a Redis that does not answer (a port nobody
listens on), or the session's real redis-server killed mid-test and started again."""

from __future__ import annotations

import math
import time

import httpx
import pytest

from proxy.budgets.windows import label_of_day
from proxy.pricing.cost import reservation_micros, usd_to_micros
from proxy.request.call import parse_call
from tests.support.configs import KEYS, make_config
from tests.support.ports import free_port

REPLICAS = 3
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
SLOW = '{"chunks": 20, "chunk_delay_s": 0.2}'


def post(server, body: dict = CHAT, key: str = "alice", headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS[key]}", **(headers or {})},
        timeout=10,
    )


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["type"], error["code"]


def prompt_tokens(body: dict) -> int:
    """The proxy's own prompt estimate for `body` (what it reserves besides max_tokens)."""
    return parse_call("chat", body, 64).prompt_tokens


@pytest.fixture
def outage(mock_upstream, start_proxy):
    """outage(patch, replicas) -> a proxy in allow mode whose Redis never answers."""

    def start(patch, replicas: int = REPLICAS):
        def full_patch(data: dict) -> None:
            data["store"] = {
                "redis_url": f"redis://127.0.0.1:{free_port()}/0",
                "on_redis_error": "allow",
                "timeout_ms": 100,
                "replicas": replicas,
            }
            data["shutdown_grace_s"] = 1  # the journal cannot flush to a Redis that is not there
            patch(data)

        server, recorder = start_proxy(make_config(mock_upstream.url, patch=full_patch))
        server.recorder = recorder
        return server

    return start


def key_limits(**limits):
    def patch(data: dict) -> None:
        data["keys"]["alice"]["limits"] = limits

    return patch


# -- item 13: the fallback's divided limits refuse, exactly ------------------------------------


def test_fallback_rpm_is_the_limit_divided_by_replicas(outage):
    server = outage(key_limits(rpm=3, rpm_burst=30))  # 10 per replica, refilling 1 a minute
    statuses = [post(server).status_code for _ in range(10)]
    assert statuses == [200] * 10
    refused = post(server)
    assert error_of(refused) == (429, "requests", "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-limit-requests"] == "10"


def test_fallback_tpm_is_the_limit_divided_by_replicas(outage):
    server = outage(key_limits(tpm=3, tpm_burst=3000))  # 1000 tokens per replica, refilling 1 a minute
    prompt = prompt_tokens(CHAT)

    def reserving(tokens: int) -> httpx.Response:
        return post(server, {**CHAT, "max_tokens": tokens - prompt})

    too_big = reserving(1001)
    assert error_of(too_big) == (429, "tokens", "rate_limit_exceeded")
    assert too_big.headers["x-should-retry"] == "false"  # larger than the replica's capacity
    first = reserving(1000)
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "1000"
    server.wait_settled()
    left = 1000 - first.json()["usage"]["total_tokens"]  # settled to the usage the mock reported
    assert error_of(reserving(left + 1)) == (429, "tokens", "rate_limit_exceeded")
    assert reserving(left).status_code == 200


def test_fallback_upstream_quota_is_the_quota_divided_by_replicas(outage):
    """An upstream quota of 9 requests a minute: 3 per replica while Redis is out, then the 429 of
    the upstream quota (the key's headers say nothing of it)."""

    def patch(data: dict) -> None:
        data["upstreams"]["mock"]["limits"] = {"rpm": 9}

    server = outage(patch)
    assert [post(server).status_code for _ in range(3)] == [200] * 3
    refused = post(server)
    assert error_of(refused) == (429, "requests", "rate_limit_exceeded")
    assert refused.json()["error"]["message"].startswith("Rate limit reached for the upstream quota of 'mock'")
    assert refused.headers["retry-after"] == "20"  # a request every 60/3 s
    assert "x-ratelimit-limit-requests" not in refused.headers


def test_fallback_max_parallel_is_the_limit_divided_by_replicas(outage):
    server = outage(key_limits(max_parallel=6))  # 2 per replica
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": SLOW}
    body = {**CHAT, "stream": True, "max_tokens": 64}
    with (
        httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=headers) as one,
        httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=headers) as two,
    ):
        assert (one.status_code, two.status_code) == (200, 200)
        streams = [one.iter_bytes(), two.iter_bytes()]  # kept: a dropped iterator closes its stream
        for stream in streams:
            next(stream)
        third = post(server)
        assert error_of(third) == (429, "parallel_requests", "rate_limit_exceeded")
    server.wait_settled()
    assert post(server).status_code == 200


def test_fallback_leases_are_renewed_past_the_lease_ttl(outage):
    ttl_s = 4

    def patch(data: dict) -> None:
        data["keys"]["alice"]["limits"] = {"max_parallel": REPLICAS}  # 1 per replica
        data["store"]["lease_ttl_s"] = ttl_s

    server = outage(patch)
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": '{"chunks": 14, "chunk_delay_s": 1.0}'}
    with httpx.stream(
        "POST",
        server.base_url + "/chat/completions",
        json={**CHAT, "stream": True, "max_tokens": 64},
        headers=headers,
        timeout=30,
    ) as long:
        assert long.status_code == 200
        started = time.monotonic()
        last_refusal = 0.0
        for _ in long.iter_bytes():  # one chunk a second: while the stream runs, its slot is held
            elapsed = time.monotonic() - started
            if elapsed < 10:  # the slot is freed after the last words, at 13-14 s
                answer = post(server)
                assert answer.status_code == 429, f"admitted {elapsed:.1f}s into the stream"
                assert error_of(answer) == (429, "parallel_requests", "rate_limit_exceeded")
                last_refusal = elapsed
    assert last_refusal > 1.5 * ttl_s, "the stream did not outlive its lease TTL"
    server.wait_settled()
    assert post(server).status_code == 200


def test_fallback_budget_is_the_budget_divided_by_replicas(outage):
    budget_usd = "0.0003"  # 300 µ$, 100 per replica

    def patch(data: dict) -> None:
        data["keys"]["alice"]["daily_budget_usd"] = budget_usd

    server = outage(patch)
    share = usd_to_micros(budget_usd) // REPLICAS
    price = server.app.state.snapshots.config.models["chat-model"].price_per_mtok
    prompt = prompt_tokens(CHAT)
    fits = max(m for m in range(1, 200) if reservation_micros(price, prompt, m) <= share)
    assert reservation_micros(price, prompt, fits + 1) > share
    refused = post(server, {**CHAT, "max_tokens": fits + 1})
    assert error_of(refused) == (429, "insufficient_quota", "insufficient_quota")
    assert post(server, {**CHAT, "max_tokens": fits}).status_code == 200


# -- item 11: a budget exhausted before the outage stays refused during it ---------------------


@pytest.mark.parametrize("replicas", [1, REPLICAS])
def test_budgets_keep_their_spend_through_an_outage(replicas, mock_upstream, start_proxy, redis_server, redis_url):
    budget_usd = "0.0006"  # 600 µ$ a team a day; a request reserves ~71 µ$ and costs ~18 µ$
    body = {**CHAT, "max_tokens": 64}

    def patch(data: dict) -> None:
        data["store"] = {"redis_url": redis_url, "on_redis_error": "allow", "timeout_ms": 100, "replicas": replicas}
        for team in ("platform", "research"):
            data["teams"][team]["daily_budget_usd"] = budget_usd

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
    limiter = server.app.state.limiter
    for _ in range(100):  # the platform team spends its whole budget through Redis
        answer = post(server, body)
        server.wait_settled()
        if answer.status_code != 200:
            break
    assert error_of(answer) == (429, "insufficient_quota", "insufficient_quota")
    for _ in range(3):  # the research team spends part of its own
        assert post(server, body, key="carol").status_code == 200
    server.wait_settled()
    day = recorder.outcomes[-1].ticket.decision.day
    research_seen = limiter.seen_committed[("research", "team", "research", day)]
    spent_before = sum(o.cost_micros for o in recorder.outcomes)

    redis_server.kill()
    try:
        for key in ("alice", "bob"):  # both keys of the exhausted team stay refused
            refused = post(server, body, key=key)
            assert error_of(refused) == (429, "insufficient_quota", "insufficient_quota"), refused.text
            assert refused.headers.get("x-should-retry") == "false"
        served = 0
        for _ in range(100):  # the research team is served from what it had left, divided
            answer = post(server, body, key="carol")
            server.wait_settled()
            if answer.status_code != 200:
                break
            served += 1
        assert error_of(answer) == (429, "insufficient_quota", "insufficient_quota")
        outage_spend = sum(o.cost_micros for o in recorder.outcomes) - spent_before
        bound = usd_to_micros(budget_usd) // replicas - math.ceil(research_seen / replicas)
        print(
            f"\nreplicas={replicas}: research served {served} requests, {outage_spend} µ$ during the outage "
            f"(bound {bound} µ$; seen committed {research_seen} µ$)"
        )
        assert served >= 1
        assert outage_spend <= bound
    finally:
        redis_server.start()


@pytest.mark.parametrize("replicas", [1, REPLICAS])
def test_window_budgets_keep_their_spend_through_an_outage(
    replicas, mock_upstream, start_proxy, redis_server, redis_url
):
    """A team's month budget and an end user's week budget exhausted through Redis stay refused
    while Redis is down (allow mode): the fallback starts every window budget from the spend last
    seen committed, divided by the replicas; another end user spends at most what was left."""
    team_usd = user_usd = "0.0006"  # a request reserves ~71 µ$ and costs ~18 µ$
    body = {**CHAT, "max_tokens": 64}

    def patch(data: dict) -> None:
        data["store"] = {"redis_url": redis_url, "on_redis_error": "allow", "timeout_ms": 100, "replicas": replicas}
        data["teams"]["platform"]["budgets"] = [{"window": "month", "usd": team_usd}]
        data["teams"]["research"]["end_users"] = {"budgets": [{"window": "week", "usd": user_usd}]}

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
    limiter = server.app.state.limiter

    def spend_until_refused(key: str, extra: dict) -> tuple[int, httpx.Response]:
        for served in range(100):
            answer = post(server, {**body, **extra}, key=key)
            server.wait_settled()
            if answer.status_code != 200:
                return served, answer
        raise AssertionError("never refused")

    assert spend_until_refused("alice", {})[0] >= 1  # the platform team spends its month through Redis
    assert spend_until_refused("carol", {"user": "ann"})[0] >= 1  # ann spends her week
    for _ in range(2):  # ben spends part of his
        assert post(server, {**body, "user": "ben"}, key="carol").status_code == 200
    server.wait_settled()
    day = recorder.outcomes[-1].ticket.decision.day
    ben_seen = limiter.seen_committed[("research", "end_user week", "ben", label_of_day("week", day))]
    spent_before = sum(o.cost_micros for o in recorder.outcomes)

    redis_server.kill()
    try:
        refusals = [
            ("alice", {}, "Team `platform` has spent $", "monthly budget"),
            ("bob", {}, "Team `platform` has spent $", "monthly budget"),
            ("carol", {"user": "ann"}, "End user `ann` has spent $", "weekly budget"),
        ]
        for key, extra, who, window in refusals:
            refused = post(server, {**body, **extra}, key=key)
            assert refused.status_code == 429, f"{who}...{window}: admitted during the outage"
            assert error_of(refused) == (429, "insufficient_quota", "insufficient_quota"), refused.text
            message = refused.json()["error"]["message"]
            assert message.startswith(who) and window in message, message
            assert refused.headers.get("x-should-retry") == "false"
        served, refused = spend_until_refused("carol", {"user": "ben"})  # from what ben had left, divided
        assert error_of(refused) == (429, "insufficient_quota", "insufficient_quota")
        outage_spend = sum(o.cost_micros for o in recorder.outcomes) - spent_before
        bound = usd_to_micros(user_usd) // replicas - math.ceil(ben_seen / replicas)
        print(
            f"\nreplicas={replicas}: ben served {served} requests, {outage_spend} µ$ during the outage "
            f"(bound {bound} µ$; seen committed {ben_seen} µ$)"
        )
        assert served >= 1
        assert outage_spend <= bound
    finally:
        redis_server.start()
