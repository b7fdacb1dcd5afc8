"""SIGTERM on a real `llm-proxy serve`: the spend journal is flushed before the process exits."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx

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
