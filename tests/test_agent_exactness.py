"""Chat's budget and tpm criteria, for the Responses and the Anthropic Messages APIs: concurrent
streaming clients, three `llm-proxy serve` processes on one real Redis.

Budget: recorded spend ends at or under the budget, and near it (the budget was used up).
tpm: tokens charged over a run of length T <= tpm_burst + tpm*T/60 (T measured by the client,
around the servers' window, so no slack), and a lower bound from what was sent before the first
refusal came back, never from how fast this machine is.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import orjson
import pytest

from tests.support.configs import ADMIN_KEY, KEYS, config_dict, exact_store
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

CLIENTS = 30
RUN_S = 1.5
MAX_RUN_S = 60.0  # the budget test's safety net: each client stops at its refusal, however slow the machine
BUDGET_MICROS = 1000
RESERVED_MICROS = 15  # at most: a few estimated prompt tokens × $0.27 + 10 × $1.10 per Mtok
APIS = {
    "responses": (
        "/v1/responses",
        {"model": "chat-model", "input": "hi", "max_output_tokens": 10, "stream": True},
        b"event: response.incomplete\n",  # 16 words asked, 10 allowed
    ),
    "messages": (
        "/v1/messages",
        {"model": "claude-model", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        b"event: message_stop\n",
    ),
}


@pytest.fixture
def mock(tmp_path):
    process = MockProcess(chunk_delay_s=0.02, workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


def agent_config(mock: MockProcess, redis_url: str) -> dict:
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data.update(log_level="warning", shutdown_grace_s=1)
    data["upstreams"]["claude"] = {**data["upstreams"]["mock"], "base_url": mock.url, "api": "anthropic"}
    data["models"]["claude-model"] = {
        "targets": [{"upstream": "claude", "model": "claude-sonnet-4-6"}],
        "price_per_mtok": {"input": "0.27", "output": "1.10"},  # chat-model's: the same reservations
    }
    return data


async def stream_until(url: str, api: str, deadline: float, calls: list, stop_when_refused: bool = False) -> None:
    path, body, last_event = APIS[api]
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            sent = time.monotonic()
            async with http.stream("POST", url + path, json=body, headers={"x-api-key": KEYS["alice"]}) as response:
                payload = await response.aread()
            calls.append((sent, time.monotonic(), response.status_code, payload))
            if response.status_code == 200:
                assert last_event in payload, payload[-300:]
            elif stop_when_refused:
                return
            else:
                await asyncio.sleep(0.02)


async def hammer(
    urls: list[str], api: str, seconds: float = RUN_S, stop_when_refused: bool = False
) -> tuple[list, float]:
    calls: list = []
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(
        *(stream_until(urls[i % len(urls)], api, deadline, calls, stop_when_refused) for i in range(CLIENTS))
    )
    return calls, time.monotonic() - started


def ledger(url: str, requests: int) -> dict:
    """The team's ledger once it holds `requests` requests (settlement follows the last byte)."""
    deadline = time.monotonic() + 5
    while True:
        report = httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        team: dict = report["teams"]["platform"]
        if team["requests"] >= requests or time.monotonic() > deadline:
            return team


def refusal_kind(api: str, payload: bytes) -> str:
    error = orjson.loads(payload)["error"]
    return str(error["type"] if api == "messages" else error["code"])


@pytest.mark.slow
@pytest.mark.parametrize("api", sorted(APIS))
def test_concurrent_agent_streams_never_overshoot_the_budget(api, mock, tmp_path, redis_url):
    data = agent_config(mock, redis_url)
    data["keys"]["alice"]["daily_budget_usd"] = "0.001"
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 3)
    try:
        # every client streams until the budget refuses it (not for a fixed time: on a loaded machine
        # the one-at-a-time drain below once ran out of its 30 s before the budget refused it)
        calls, _ = asyncio.run(hammer([r.url for r in replicas], api, MAX_RUN_S, stop_when_refused=True))
        # then one at a time, until refused: with nothing in flight a refusal means the budget is used up
        asyncio.run(stream_until(replicas[0].url, api, time.monotonic() + MAX_RUN_S, calls, stop_when_refused=True))
        statuses = [status for _, _, status, _ in calls]
        assert statuses[-1] == 429
        assert set(statuses) <= {200, 429}
        kinds = {refusal_kind(api, payload) for _, _, status, payload in calls if status == 429}
        assert kinds == {"rate_limit_error" if api == "messages" else "insufficient_quota"}
        spent = ledger(replicas[0].url, statuses.count(200))["spend_micros"]
        print(f"{api}: {statuses.count(200)} streams admitted, {statuses.count(429)} refused, spend {spent} µ$")
        assert spent <= BUDGET_MICROS
        assert spent > BUDGET_MICROS - 2 * RESERVED_MICROS, "the budget was not used up: the test proves little"
    finally:
        stop_all(replicas)


@pytest.mark.slow
@pytest.mark.parametrize("api", sorted(APIS))
def test_agent_tpm_is_exact_across_replicas(api, mock, tmp_path, redis_url):
    # a few streams' reservations, then about one stream's worth a second: the first wave of 30
    # clients goes past it on any machine (at 6000 tpm and a burst of 200, three replicas starved
    # of CPU never admitted faster than the refill, and nothing was refused)
    tpm, burst = 1_200, 100
    data = agent_config(mock, redis_url)
    data["keys"]["alice"]["limits"] = {"tpm": tpm, "tpm_burst": burst}
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 3)
    try:
        calls, elapsed = asyncio.run(hammer([r.url for r in replicas], api))
        statuses = [status for _, _, status, _ in calls]
        assert set(statuses) <= {200, 429}
        team = ledger(replicas[0].url, statuses.count(200))
        charged = team["prompt_tokens"] + team["completion_tokens"]
        bound = burst + math.floor(tpm * elapsed / 60)
        first_refused = min((answered for _, answered, status, _ in calls if status == 429), default=math.inf)
        sent_before = [c for c in calls if c[2] == 200 and c[0] < first_refused]
        print(f"{api} tpm: {charged} tokens charged in {elapsed:.2f}s (bound {bound}), {len(sent_before)} early")
        assert 429 in statuses, "the limit was never reached: the test proves little"
        assert charged <= bound
        assert charged >= sum(_tokens(api, payload) for _, _, _, payload in sent_before)
    finally:
        stop_all(replicas)


def _tokens(api: str, payload: bytes) -> int:
    """The tokens one finished stream reported (Responses: the final event's usage; Messages:
    message_start's input and message_delta's output)."""
    total = 0
    for block in payload.split(b"\n\n"):
        data = next((line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")), b"")
        if not data:
            continue
        event = orjson.loads(data)
        if api == "responses" and event.get("type") == "response.completed":
            usage = event["response"]["usage"]
            total += usage["input_tokens"] + usage["output_tokens"]
        elif api == "messages" and event.get("type") == "message_start":
            total += event["message"]["usage"]["input_tokens"]
        elif api == "messages" and event.get("type") == "message_delta":
            total += event["usage"]["output_tokens"]
    return int(total)
