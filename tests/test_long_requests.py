"""Requests longer than `store.lease_ttl_s`: their leases are renewed while they run, and a dead
replica's leases still end after the TTL. Real Redis, a real proxy on a port, the mock upstream
streaming slowly, the OpenAI SDK as the client; the dead replica is a `python -m proxy serve`
process, SIGKILLed mid-stream; a renewal that fails while Redis is paused (SIGSTOP) is retried."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import orjson
import pytest
import redis

from tests.support.configs import KEYS, config_dict, make_config
from tests.support.metrics import samples
from tests.support.processes import MockProcess, proxy_process, write_config

# Renewed every TTL / 3, a lease has ~TTL / 2 of slack: 2 s in this process, which shares its GIL
# and these loaded cores with the test's own threads (a 2 s TTL failed once under load here).
LEASE_TTL_S = 4
TEAM_BUDGET_USD = "1"
PAR_KEY = "llmrl:{platform}:k:alice:par"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}
STREAM = {"chunks": 16, "chunk_delay_s": 1.0}  # 16 s: four lease TTLs


def long_lived(redis_url: str):
    def patch(data: dict) -> None:
        data["store"] = {
            "redis_url": redis_url,
            "lease_ttl_s": LEASE_TTL_S,
            "on_redis_error": "deny",
            "timeout_ms": 2000,
        }
        data["keys"]["alice"]["limits"] = {"max_parallel": 1}
        data["teams"]["platform"]["daily_budget_usd"] = TEAM_BUDGET_USD

    return patch


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEYS["alice"], max_retries=0, timeout=20)


def team_budget(client: redis.Redis) -> tuple[int, int]:
    """(held micros, holds in the lease set) of the team's budget today."""
    [name] = [n for n in client.scan_iter("llmrl:{platform}:t:b:*") if not n.endswith(b":leases")]
    return int(client.hget(name, "held") or 0), client.zcard(name + b":leases")


def test_a_stream_four_lease_ttls_long_keeps_its_slot_and_budget_hold(mock_upstream, start_proxy, redis_url):
    server, recorder = start_proxy(make_config(mock_upstream.url, patch=long_lived(redis_url)))
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    streamed: dict = {}
    first_chunk = threading.Event()

    def stream() -> None:
        chunks = sdk(server.base_url).chat.completions.create(
            **CHAT, stream=True, extra_headers={"x-mock-fault": orjson.dumps(STREAM).decode()}
        )
        words = []
        for chunk in chunks:
            first_chunk.set()
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
        streamed["words"] = len(words)

    thread = threading.Thread(target=stream)
    started = time.monotonic()
    thread.start()
    assert first_chunk.wait(10)
    held, holds = team_budget(client)
    assert held > 0 and holds == 1
    refusals = 0
    probe_until = started + STREAM["chunks"] * STREAM["chunk_delay_s"] - 4  # the slot is freed after the last byte
    while time.monotonic() < probe_until:
        try:
            sdk(server.base_url).chat.completions.create(**CHAT)
            pytest.fail(f"a second request was admitted {time.monotonic() - started:.1f}s into the stream")
        except openai.RateLimitError as exc:
            assert exc.body["type"] == "parallel_requests", exc.body
            refusals += 1
        assert team_budget(client) == (held, 1)  # the stream's reservation is still held, whole
        time.sleep(0.25)
    assert thread.is_alive() and refusals >= 5
    thread.join()
    assert streamed["words"] == STREAM["chunks"]
    server.wait_settled()
    assert team_budget(client) == (0, 0)
    assert client.zcard(PAR_KEY) == 0
    sdk(server.base_url).chat.completions.create(**CHAT)  # the slot is free once the stream ended
    server.wait_settled()  # an outcome is recorded once its request has settled
    assert [o.status for o in recorder.outcomes].count(200) == 2


@pytest.fixture
def slow_mock(tmp_path):
    process = MockProcess(chunk_delay_s=0.5, chunks=60, workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


def test_a_dead_replicas_lease_ends_after_the_ttl(slow_mock, tmp_path, redis_url):
    data = config_dict(slow_mock.base_url)
    long_lived(redis_url)(data)
    config_path = write_config(tmp_path / "config.yaml", data)
    doomed = proxy_process(config_path, name="doomed").start().wait_ready()
    survivor = proxy_process(config_path, name="survivor").start().wait_ready()
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    try:
        with httpx.stream(
            "POST", doomed.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers, timeout=30
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            next(chunks)
            time.sleep(LEASE_TTL_S * 1.5)  # the doomed replica renews its lease meanwhile
            assert client.zcard(PAR_KEY) == 1
            refused = httpx.post(survivor.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
            assert refused.status_code == 429, refused.text
            doomed.signal(signal.SIGKILL)
            killed = time.monotonic()
        doomed.popen.wait(10)
        # nothing settles or renews the dead replica's lease: it ends at most lease_ttl_s after the
        # kill (its last renewal came before it). A refusal means the lease was alive after the
        # request was sent, so each refused request must have been sent before kill + TTL; a slow
        # machine only makes requests later, never earlier.
        while True:
            sent = time.monotonic()
            answer = httpx.post(survivor.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
            if answer.status_code == 200:
                break
            assert answer.status_code == 429 and answer.json()["error"]["type"] == "parallel_requests"
            assert sent - killed < LEASE_TTL_S + 0.05, "the dead replica's lease outlived its TTL"
            time.sleep(0.1)
        print(
            f"\ndead replica's lease ended {time.monotonic() - killed:.2f}s after SIGKILL (lease_ttl_s={LEASE_TTL_S})"
        )
    finally:
        doomed.stop()
        survivor.stop()
    assert "Traceback" not in survivor.output(), survivor.output()


def test_a_renewal_that_fails_while_redis_is_paused_is_retried(mock_upstream, start_proxy, redis_server, redis_url):
    ttl_s = 6  # renewed from 2 s on, checked every second; the lease ends at 6 s unless renewed

    def patch(data: dict) -> None:
        long_lived(redis_url)(data)
        data["store"].update(lease_ttl_s=ttl_s, timeout_ms=300)

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    fault = orjson.dumps({"chunks": 16, "chunk_delay_s": 1.0}).decode()
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": fault}
    pid = redis_server._process.pid
    with httpx.stream(
        "POST", server.base_url + "/chat/completions", json={**CHAT, "stream": True}, headers=headers, timeout=30
    ) as long:
        assert long.status_code == 200
        started = time.monotonic()
        chunks = long.iter_bytes()
        next(chunks)
        time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))
        os.kill(pid, signal.SIGSTOP)  # the first renewal (due at 2 s) times out
        try:
            time.sleep(2.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        last_refusal = 0.0
        for _ in chunks:
            elapsed = time.monotonic() - started
            if ttl_s + 0.5 < elapsed < 12:  # past the unrenewed lease's end, well before the stream's
                answer = httpx.post(
                    server.base_url + "/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {KEYS['alice']}"},
                    timeout=10,
                )
                assert answer.status_code == 429, f"admitted {elapsed:.1f}s into the stream: {answer.text}"
                assert answer.json()["error"]["type"] == "parallel_requests"
                last_refusal = elapsed
    assert last_refusal > ttl_s + 1
    metrics = samples(httpx.get(server.url + "/metrics", timeout=10).text)
    renew_errors = [v for labels, v in metrics["llm_proxy_store_errors_total"] if labels["op"] == "renew"]
    assert renew_errors and renew_errors[0] >= 1, "no renewal failed during the pause: the test proved nothing"
