"""SIGTERM on a real `llm-proxy serve`: the spend journal is flushed before the process exits."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
import redis

from proxy.limits.redis_store import RedisStore
from tests.support.configs import KEYS, config_dict
from tests.support.processes import proxy_process, start_all, write_config
from tests.support.redis_server import RedisServer

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def ledger_total(url: str) -> dict:
    async def read():
        store = RedisStore.from_url(url, timeout_ms=2000)
        try:
            report = await store.usage(time.strftime("%Y-%m-%d", time.gmtime()), ["platform", "research"])
        finally:
            await store.close()
        teams = report["teams"].values()
        return {name: sum(team[name] for team in teams) for name in ("requests", "completion_tokens")}

    return asyncio.run(read())


def test_sigterm_flushes_the_journal_once_redis_returns(mock_upstream, tmp_path):
    redis = RedisServer(persistent=True)
    try:
        data = config_dict(mock_upstream.url)
        data["store"] = {"redis_url": redis.url, "on_redis_error": "allow", "timeout_ms": 100}
        data["shutdown_grace_s"] = 8
        proxy = start_all([proxy_process(write_config(tmp_path / "config.yaml", data))])[0]
        headers = {"Authorization": f"Bearer {KEYS['alice']}"}
        with httpx.Client(base_url=proxy.url, headers=headers, timeout=10) as http:
            assert [http.post("/v1/chat/completions", json=CHAT).status_code for _ in range(3)] == [200] * 3
            redis.kill()
            assert [http.post("/v1/chat/completions", json=CHAT).status_code for _ in range(7)] == [200] * 7
        proxy.signal(signal.SIGTERM)  # Redis is still down: the journal waits for it
        threading.Timer(1.5, redis.start).start()
        assert proxy.popen.wait(20) == 0
        assert ledger_total(redis.url) == {"requests": 10, "completion_tokens": 100}
        assert "settlements could not be flushed" not in proxy.output()
    finally:
        time.sleep(1.6)
        redis.stop()


def stream_in_thread(url: str, fault: dict, events: list, first_chunk: threading.Event) -> threading.Thread:
    def run():
        try:
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                timeout=30,
                json={**CHAT, "max_tokens": 100, "stream": True},
                headers={"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": json.dumps(fault)},
            ) as response:
                for chunk in response.iter_bytes():
                    events.append(chunk)
                    first_chunk.set()
        except httpx.HTTPError as exc:
            events.append(exc)
        first_chunk.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def parallel_slots(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(client.zcard(key) for key in client.scan_iter("llmrl:*:par"))
    finally:
        client.close()


def streaming_proxy(mock_upstream, tmp_path, redis_url, grace_s: float, fault: dict):
    """A real `llm-proxy serve` with one stream in flight (its first chunk received)."""
    data = config_dict(mock_upstream.url, redis_url=redis_url)
    data["shutdown_grace_s"] = grace_s
    proxy = start_all([proxy_process(write_config(tmp_path / "config.yaml", data))])[0]
    events, first = [], threading.Event()
    thread = stream_in_thread(proxy.url, fault, events, first)
    assert first.wait(10)
    return proxy, thread, events


def test_sigterm_lets_inflight_streams_finish_then_exits_0(mock_upstream, tmp_path, redis_url):
    proxy, thread, events = streaming_proxy(
        mock_upstream, tmp_path, redis_url, 10, {"chunk_delay_s": 0.1, "chunks": 15}
    )
    proxy.signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(proxy.url + "/healthz", timeout=1)
    thread.join(20)
    assert proxy.popen.wait(20) == 0
    body = b"".join(e for e in events if isinstance(e, bytes))
    assert body.endswith(b"data: [DONE]\n\n"), "the in-flight stream was cut by the shutdown"
    assert ledger_total(redis_url) == {"requests": 1, "completion_tokens": 15}
    assert parallel_slots(redis_url) == 0


def test_a_stream_longer_than_the_grace_period_is_cut_and_settled(mock_upstream, tmp_path, redis_url):
    proxy, thread, events = streaming_proxy(mock_upstream, tmp_path, redis_url, 1, {"chunk_delay_s": 0.2, "chunks": 60})
    proxy.signal(signal.SIGTERM)
    assert proxy.popen.wait(20) == 0
    thread.join(20)
    body = b"".join(e for e in events if isinstance(e, bytes))
    assert b"data: [DONE]" not in body
    settled = ledger_total(redis_url)
    assert settled["requests"] == 1 and 0 < settled["completion_tokens"] < 60  # what was produced
    assert parallel_slots(redis_url) == 0
    assert "unsettled at shutdown" not in proxy.output()


def test_the_grace_period_follows_a_reload(mock_upstream, tmp_path, redis_url):
    """Started with a 1 s grace, reloaded (SIGHUP) to 15 s: a 3 s stream in flight at SIGTERM
    finishes with [DONE] (with the grace it started with, it would be cut after 1 s)."""
    proxy, thread, events = streaming_proxy(mock_upstream, tmp_path, redis_url, 1, {"chunk_delay_s": 0.1, "chunks": 30})
    data = config_dict(mock_upstream.url, redis_url=redis_url)
    data["shutdown_grace_s"] = 15
    write_config(tmp_path / "config.yaml", data)
    proxy.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config reloaded" not in proxy.output():
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.05)
    proxy.signal(signal.SIGTERM)
    assert proxy.popen.wait(30) == 0
    thread.join(20)
    body = b"".join(e for e in events if isinstance(e, bytes))
    assert body.endswith(b"data: [DONE]\n\n"), "the stream was cut after the grace period the proxy started with"
    assert ledger_total(redis_url) == {"requests": 1, "completion_tokens": 30}
