"""The budget bound across replicas: 50 concurrent streaming clients, three `llm-proxy serve`
processes on one real Redis, a small daily budget. Recorded spend ends at or under the budget;
the only excess allowed is usage an upstream reports above the reservation, measured here too."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from tests.support.configs import ADMIN_KEY, KEYS, config_dict, exact_store
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

CLIENTS = 50
MAX_RUN_S = 60.0  # a safety net: each client stops at its first budget refusal, however slow the machine
BUDGET_MICROS = 1000
STREAM = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
RESERVED_MICROS = 14  # ceil(8 estimated prompt tokens × $0.27 + 10 × $1.10 per Mtok)


@pytest.fixture
def mock(tmp_path):
    process = MockProcess(chunk_delay_s=0.02, workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


async def stream_until(url: str, key: str, deadline: float, outcomes: list, headers: dict) -> None:
    """Streams until the budget refuses this client (not for a fixed time: a loaded machine must
    not leave the budget unspent), or the safety deadline."""
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            async with http.stream(
                "POST",
                url + "/v1/chat/completions",
                json=STREAM,
                headers={"Authorization": f"Bearer {KEYS[key]}", **headers},
            ) as response:
                body = await response.aread()
            outcomes.append((response.status_code, body))
            if response.status_code == 429:
                if b"insufficient_quota" in body:
                    return
                await asyncio.sleep(0.02)


async def hammer(urls: list[str], keys: list[str], headers: dict) -> list:
    outcomes: list = []
    deadline = time.monotonic() + MAX_RUN_S
    await asyncio.gather(
        *(stream_until(urls[i % len(urls)], keys[i % len(keys)], deadline, outcomes, headers) for i in range(CLIENTS))
    )
    return outcomes


def ledger(url: str, team: str = "platform", requests: int | None = None) -> dict:
    """The team's ledger; with `requests`, once it holds that many (settlement follows the last byte)."""
    deadline = time.monotonic() + 5
    while True:
        report = httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        team_report = report["teams"][team]
        if requests is None or team_report["requests"] >= requests or time.monotonic() > deadline:
            return team_report


@pytest.mark.parametrize("scope", ["key", "team"])
def test_concurrent_streams_never_overshoot_the_budget(scope, mock, tmp_path, redis_url):
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data.update(log_level="warning", shutdown_grace_s=1)
    if scope == "key":
        data["keys"]["alice"]["daily_budget_usd"] = "0.001"
        keys = ["alice"]
    else:
        data["teams"]["platform"]["daily_budget_usd"] = "0.001"
        keys = ["alice", "bob"]
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 3)
    try:
        outcomes = asyncio.run(hammer([r.url for r in replicas], keys, {}))
        statuses = [status for status, _ in outcomes]
        spent = ledger(replicas[0].url, requests=statuses.count(200))["spend_micros"]
        assert set(statuses) <= {200, 429}
        refusals = [orjson.loads(body)["error"]["code"] for status, body in outcomes if status == 429]
        assert set(refusals) == {"insufficient_quota"}
        assert all(body.endswith(b"data: [DONE]\n\n") for status, body in outcomes if status == 200)
        print(
            f"{scope} budget {BUDGET_MICROS} µ$: {statuses.count(200)} streams admitted, "
            f"{statuses.count(429)} refused, recorded spend {spent} µ$"
        )
        assert spent <= BUDGET_MICROS
        assert spent > BUDGET_MICROS - 2 * RESERVED_MICROS, "the budget was not used up: the test proves little"
        assert ledger(replicas[0].url)["requests"] == statuses.count(200)
    finally:
        stop_all(replicas)


def test_excess_only_where_the_upstream_reports_more_than_reserved(mock, tmp_path, redis_url):
    """An upstream that reports 3× the completion tokens it was allowed: the overshoot is bounded
    by the requests in flight when the budget ran out, each over by its unreserved usage."""
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data.update(log_level="warning", shutdown_grace_s=1)
    data["keys"]["alice"]["daily_budget_usd"] = "0.001"
    data["keys"]["alice"]["limits"] = {"max_parallel": 10}
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 3)
    try:
        fault = orjson.dumps({"usage_multiplier": 3.0}).decode()
        outcomes = asyncio.run(hammer([r.url for r in replicas], ["alice"], {"x-mock-fault": fault}))
        admitted = sum(1 for status, _ in outcomes if status == 200)
        spent = ledger(replicas[0].url, requests=admitted)["spend_micros"]
        cost = 0.27 + 30 * 1.10  # 1 prompt token, 30 completion tokens reported
        per_request_excess = round(cost) - RESERVED_MICROS
        print(
            f"upstream over-reporting: {admitted} admitted, spend {spent} µ$ of {BUDGET_MICROS}, "
            f"excess {spent - BUDGET_MICROS} µ$ (≤ {10 * per_request_excess} for 10 in flight)"
        )
        assert spent <= BUDGET_MICROS + 10 * per_request_excess
    finally:
        stop_all(replicas)
