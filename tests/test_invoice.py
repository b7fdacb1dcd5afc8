"""The invoice test: a day of mixed chat traffic through the mock (plain and streamed; cache
reads, cache writes, reasoning tokens, a long-context tier) books exactly the cost computed here,
independently, from the usage the mock reported to the client, and the ledger keeps every priced
token class.

The cost is computed the way an invoice is: each class at its price per million tokens (the
tier's prices when the prompt is above its threshold), cached tokens taken out of the prompt and
reasoning tokens out of the completion once, one half-up rounding per request. Chat only: the
Responses and Messages routes are issue 12's and not on this branch."""

from __future__ import annotations

import asyncio
import itertools
from decimal import ROUND_HALF_UP, Decimal

import httpx
import openai
import orjson
import pytest

from tests.support.configs import ADMIN_KEY, KEYS, config_dict, exact_store
from tests.support.processes import MockProcess, start_proxies, stop_all, write_config

BASE = {"input": "0.27", "output": "1.10", "cached_input": "0.07", "cache_write": "0.3375", "reasoning": "2.19"}
TIER = {
    "above_input_tokens": 40,
    "input": "0.55",
    "output": "2.20",
    "cached_input": "0.14",
    "cache_write": "0.6875",
    "reasoning": "4.38",
}
SHORT = [{"role": "user", "content": "a short question of a few more words than the cache holds"}]
LONG = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}]  # well above 40 tokens


@pytest.fixture
def mock(tmp_path):
    process = MockProcess(workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


def invoice_micros(usage: dict) -> int:
    """One request's cost from the usage the upstream reported, as the invoice prices it."""
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    written = (usage.get("prompt_tokens_details") or {}).get("cache_write_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    prices = {**BASE, **{k: v for k, v in TIER.items() if k != "above_input_tokens"}} if prompt > 40 else BASE
    cost = (
        Decimal(prices["input"]) * (prompt - cached - written)
        + Decimal(prices["cached_input"]) * cached
        + Decimal(prices["cache_write"]) * written
        + Decimal(prices["output"]) * (completion - reasoning)
        + Decimal(prices["reasoning"]) * reasoning
    )
    return int(cost.quantize(Decimal(1), rounding=ROUND_HALF_UP))


async def one_call(
    client: openai.AsyncOpenAI, stream: bool, long: bool, cached: int, written: int, reasoning: int
) -> dict:
    fault = orjson.dumps(
        {"cached_tokens": cached, "cache_write_tokens": written, "reasoning_tokens": reasoning}
    ).decode()
    request = {"model": "chat-model", "messages": LONG if long else SHORT, "max_tokens": 12}
    if not stream:
        response = await client.chat.completions.create(**request, extra_headers={"x-mock-fault": fault})
        assert response.usage is not None
        return response.usage.model_dump()
    chunks = await client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}, extra_headers={"x-mock-fault": fault}
    )
    usage = None
    async for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    assert usage is not None
    return usage


async def traffic(url: str) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS["alice"], max_retries=0)
    mix = list(itertools.product([False, True], [False, True], [0, 3], [0, 2], [0, 4]))  # 32 kinds of call
    usages = await asyncio.gather(*(one_call(client, *kind) for kind in mix * 3))
    await client.close()
    return list(usages)


def test_the_ledger_books_exactly_what_the_invoice_charges(mock, tmp_path, redis_url):
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data["models"]["chat-model"]["price_per_mtok"] = {**BASE, "tiers": [TIER]}
    data["models"]["chat-model"]["context_window"] = 100_000
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 1)
    try:
        usages = asyncio.run(traffic(replicas[0].url))
        assert {u["prompt_tokens"] > 40 for u in usages} == {True, False}  # both tiers were used
        assert any((u.get("completion_tokens_details") or {}).get("reasoning_tokens") for u in usages)
        expected = sum(invoice_micros(u) for u in usages)
        report = httpx.get(replicas[0].url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        model = report["teams"]["platform"]["keys"]["alice"]["models"]["chat-model"]
        print(f"invoice: {len(usages)} calls, {expected} µ$ computed, {model['spend_micros']} µ$ booked")
        assert model["requests"] == len(usages)
        assert model["spend_micros"] == expected
        assert model["cached_tokens"] == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        assert model["cache_write_tokens"] == sum(u["prompt_tokens_details"]["cache_write_tokens"] for u in usages)
        assert model["reasoning_tokens"] == sum(u["completion_tokens_details"]["reasoning_tokens"] for u in usages)
        assert model["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    finally:
        stop_all(replicas)
