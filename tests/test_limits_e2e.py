"""Limits through the whole proxy: real Redis, uvicorn on a port, the mock upstream, the SDK."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import orjson
import pytest

from proxy.limits.redis_store import RedisStore
from tests.support.clock import Clock
from tests.support.configs import KEYS, make_config
from tests.support.errors import error_reply, openai_error

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# With the clock frozen, buckets never refill, but Redis expires a bucket in real time once it would
# be full again (+1 s). Tests that read a bucket back refill it at 6 tokens a minute, so a bucket one
# token short outlives 11 s of real time instead of ~1 s.
SLOW_REFILL_TPM = 6


def with_limits(key_limits=None, team_limits=None, **extra):
    def patch(data):
        if key_limits is not None:
            data["keys"]["alice"]["limits"] = key_limits
        if team_limits is not None:
            data["teams"]["platform"]["limits"] = team_limits
        data.update(extra)

    return patch


def post(server, body=CHAT, key="alice", headers=None):
    return httpx.post(
        server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS[key]}", **(headers or {})},
        timeout=10,
    )


def wait_settled(server, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(server.recorder.outcomes) < count:
        assert time.monotonic() < deadline, "not settled"
        time.sleep(0.005)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limited(mock_upstream, start_proxy, redis_url, clock):
    """start(patch) -> server on real Redis with a frozen clock."""

    def start(patch):
        config = make_config(mock_upstream.url, redis_url=redis_url, patch=patch)
        store = RedisStore.from_url(redis_url, clock_us=clock)
        server, recorder = start_proxy(config, store=store)
        server.recorder = recorder
        return server

    return start


def test_headers_come_from_the_tightest_bucket(limited):
    server = limited(with_limits({"rpm": 60, "tpm": 10_000}, {"rpm": 600, "tpm": 5_000}))
    response = post(server)
    assert response.status_code == 200
    h = response.headers
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "59"
    assert h["x-ratelimit-reset-requests"] == "1s"
    assert h["x-ratelimit-limit-tokens"] == "5000"
    assert int(h["x-ratelimit-remaining-tokens"]) < 5000


def test_rpm_refusal_is_openai_shaped_and_exact(limited, clock):
    server = limited(with_limits({"rpm": 60, "rpm_burst": 2}))
    assert post(server).status_code == 200
    assert post(server).status_code == 200
    refused = post(server)
    assert error_reply(refused) == (
        429,
        openai_error(
            "Rate limit reached for key 'alice' on requests per minute. Please try again in 1s.",
            "requests",
            "rate_limit_exceeded",
        ),
    )
    assert refused.headers["retry-after"] == "1" and refused.headers["retry-after-ms"] == "1000"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(0.999)
    assert post(server).status_code == 429
    clock.advance(0.001)
    assert post(server).status_code == 200


def test_team_limit_shared_by_two_keys(limited):
    server = limited(with_limits(team_limits={"rpm": 60, "rpm_burst": 3}))
    assert [post(server, key=k).status_code for k in ("alice", "bob", "alice")] == [200, 200, 200]
    refused = post(server, key="bob")
    assert error_reply(refused) == (
        429,
        openai_error(
            "Rate limit reached for team 'platform' on requests per minute. Please try again in 1s.",
            "requests",
            "rate_limit_exceeded",
        ),
    )
    assert post(server, key="carol").status_code == 200  # another team is untouched


def test_sdk_retry_honours_our_headers(mock_upstream, start_proxy, redis_url):
    config = make_config(
        mock_upstream.url, redis_url=redis_url, patch=with_limits({"rpm": 120, "rpm_burst": 1})
    )  # one request per 0.5 s
    server, recorder = start_proxy(config)
    with openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=2) as sdk:
        sdk.chat.completions.create(**CHAT)
        started = time.monotonic()
        completion = sdk.chat.completions.create(**CHAT)
        waited = time.monotonic() - started
    assert completion.choices
    deadline = time.monotonic() + 3
    while len(recorder.outcomes) < 3 and time.monotonic() < deadline:  # settled just after the reply
        time.sleep(0.01)
    statuses = sorted(o.status for o in recorder.outcomes)  # a 200 is recorded once it has settled
    assert statuses == [200, 200, 429], "the SDK's first retry should have been admitted"
    assert waited > 0.3  # it waited for the bucket (retry-after-ms 500), and once (no upper time
    # bound: one retry, admitted, is what the statuses prove; a duration bound measures load)


def test_request_that_can_never_fit(limited):
    server = limited(with_limits({"tpm": 100}))
    refused = post(server, {**CHAT, "max_tokens": 500})
    assert error_reply(refused) == (
        429,
        openai_error(
            "Request too large for key 'alice': it needs more tokens per minute than the limit's capacity allows, "
            "so it can never be admitted. Reduce the prompt or max_tokens.",
            "tokens",
            "rate_limit_exceeded",
        ),
    )
    assert refused.headers["x-should-retry"] == "false"
    with (
        openai.OpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=2) as sdk,
        pytest.raises(openai.RateLimitError),
    ):
        sdk.chat.completions.create(**{**CHAT, "max_tokens": 500})
    assert len([o for o in server.recorder.outcomes if o.status == 429]) == 2  # no SDK retries


def test_parallel_cap_holds_until_the_stream_ends(limited):
    server = limited(with_limits({"max_parallel": 1}))
    # 2 s of stream after its first chunk for the second request to be refused in: 0.4 s was not
    # always enough on a loaded machine, and the second request was rightly admitted after the end
    slow = orjson.dumps({"chunk_delay_s": 0.25, "chunks": 9}).decode()
    first_chunk = threading.Event()
    result = {}

    def stream():
        with httpx.stream(
            "POST",
            server.base_url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": slow},
        ) as r:
            for _ in r.iter_bytes():
                first_chunk.set()
            result["status"] = r.status_code

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_chunk.wait(5)
    refused = post(server)
    assert error_reply(refused) == (
        429,
        openai_error(
            "Rate limit reached for key 'alice' on parallel requests. Please try again in 1s.",
            "parallel_requests",
            "rate_limit_exceeded",
        ),
    )
    thread.join(10)
    assert result["status"] == 200
    deadline = time.monotonic() + 3
    while post(server).status_code != 200:
        assert time.monotonic() < deadline


def test_abandoned_stream_releases_its_slot_and_is_reconciled(limited, clock):
    server = limited(with_limits({"max_parallel": 1, "tpm": SLOW_REFILL_TPM, "tpm_burst": 6000}))
    slow = orjson.dumps({"chunk_delay_s": 0.2, "chunks": 30}).decode()
    with httpx.stream(
        "POST",
        server.base_url + "/chat/completions",
        json={**CHAT, "stream": True, "max_tokens": 1000},
        headers={"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": slow},
    ) as r:
        for _ in r.iter_bytes():
            break
    deadline = time.monotonic() + 3
    while not server.recorder.outcomes:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cut = server.recorder.outcomes[0]
    assert cut.client_gone
    charged = cut.usage.total_tokens
    assert 0 < charged < 1000, "the reservation of 1000 completion tokens was not reconciled"
    response = post(server, {**CHAT, "max_tokens": 10})
    assert response.status_code == 200  # slot released
    reserved_second = (
        int(response.headers["x-ratelimit-limit-tokens"])
        - int(response.headers["x-ratelimit-remaining-tokens"])
        - charged
    )
    assert 0 < reserved_second <= 20  # bucket = capacity - actual usage of the first - this reservation


def test_streamed_and_plain_requests_are_reconciled_to_actual_usage(limited):
    server = limited(with_limits({"tpm": SLOW_REFILL_TPM, "tpm_burst": 60_000}))
    for body in ({**CHAT, "max_tokens": 2000}, {**CHAT, "max_tokens": 2000, "stream": True}):
        with httpx.stream(
            "POST",
            server.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
        ) as r:
            r.read()
    wait_settled(server, 2)  # settlement follows the last byte
    probe = post(server, {**CHAT, "max_tokens": 1})
    wait_settled(server, 3)
    used = sum(o.usage.total_tokens for o in server.recorder.outcomes[:2])
    assert used == 2 * (16 + 1)  # 16 completion words + 1 prompt token, as the mock reported
    remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
    probe_reservation = server.recorder.outcomes[2].ticket.tokens
    assert remaining == 60_000 - used - probe_reservation


@pytest.mark.parametrize("mode", ["allow", "deny"])
def test_redis_outage_follows_on_redis_error(mode, mock_upstream, start_proxy, redis_server, redis_url, caplog):
    def patch(data):
        data["store"] = {"redis_url": redis_url, "on_redis_error": mode, "timeout_ms": 100}
        data["keys"]["alice"]["limits"] = {"rpm": 600}

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
    assert post(server).status_code == 200
    redis_server.kill()
    try:
        with caplog.at_level(logging.ERROR, logger="proxy.limits"):
            statuses = [post(server).status_code for _ in range(5)]
        if mode == "allow":
            assert statuses == [200] * 5
        else:
            assert statuses == [503] * 5
            refused = post(server)
            assert error_reply(refused) == (
                503,
                openai_error(
                    "The rate-limit store is unavailable; please retry shortly.", "server_error", "store_unavailable"
                ),
            )
        outage_logs = [r for r in caplog.records if "store unavailable" in r.getMessage()]
        assert len(outage_logs) == 1, "an outage is logged once, not once per request"
        ready = httpx.get(server.url + "/readyz")
        if mode == "allow":  # still serving through the fallback limiter
            assert (ready.status_code, ready.json()["status"]) == (200, "degraded")
        else:
            assert ready.status_code == 503
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while post(server).status_code != 200:
        assert time.monotonic() < deadline, "no automatic recovery"
        time.sleep(0.05)
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert 500 not in [o.status for o in recorder.outcomes]
