"""The invoice test: a day of mixed traffic through the mock on chat completions, the Responses
API and Anthropic's Messages API (plain and streamed; cache reads, cache writes, reasoning tokens,
a long-context tier) books exactly the cost computed here, independently, from the usage the mock
reported to the client through the official SDKs, and the ledger keeps every priced token class.

The cost is computed the way an invoice is: each class at its price per million tokens (the
tier's prices when the whole prompt is above its threshold), cache reads and writes taken out of
the prompt and reasoning tokens out of the completion once (OpenAI counts both inside its totals;
Anthropic reports `cache_creation_input_tokens` and `cache_read_input_tokens` beside
`input_tokens`, and its thinking inside `output_tokens`), one half-up rounding per request.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from decimal import ROUND_HALF_UP, Decimal

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.support.configs import ADMIN_KEY, KEYS, UPSTREAM_KEY, config_dict, exact_store
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
CLAUDE = {"input": "3", "output": "15", "cached_input": "0.30", "cache_write": "3.75"}  # thinking is output
CLAUDE_TIER = {"above_input_tokens": 40, "input": "6", "output": "22.50", "cached_input": "0.60", "cache_write": "7.50"}
SHORT = [{"role": "user", "content": "a short question of a few more words than the cache holds"}]
LONG = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}]  # well above 40 tokens


@pytest.fixture
def mock(tmp_path):
    process = MockProcess(workdir=tmp_path).start().wait_ready()
    yield process
    process.stop()


def priced(base: dict, tier: dict, prompt: int, tokens: dict[str, int]) -> int:
    """µ$ of `tokens` ({price name: tokens}) at `base`, or at `tier` above its threshold, rounded once."""
    prices = {**base, **tier} if prompt > tier["above_input_tokens"] else base
    cost = sum(Decimal(prices[name]) * count for name, count in tokens.items())
    return int(cost.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def chat_invoice(usage: dict) -> int:
    """A chat completion's cost from its `usage` (cache reads and writes inside prompt_tokens,
    reasoning inside completion_tokens)."""
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    written = (usage.get("prompt_tokens_details") or {}).get("cache_write_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return priced(
        BASE,
        TIER,
        prompt,
        {
            "input": prompt - cached - written,
            "cached_input": cached,
            "cache_write": written,
            "output": completion - reasoning,
            "reasoning": reasoning,
        },
    )


def responses_invoice(usage: dict) -> int:
    """A response's cost from its `usage` (the Responses API's names, the same inclusions as chat)."""
    prompt, output = usage["input_tokens"], usage["output_tokens"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    written = usage["input_tokens_details"]["cache_write_tokens"]
    reasoning = usage["output_tokens_details"]["reasoning_tokens"]
    return priced(
        BASE,
        TIER,
        prompt,
        {
            "input": prompt - cached - written,
            "cached_input": cached,
            "cache_write": written,
            "output": output - reasoning,
            "reasoning": reasoning,
        },
    )


def messages_invoice(usage: dict) -> int:
    """A message's cost from Anthropic's `usage`: input_tokens excludes the cache reads and writes,
    which are reported beside it; the whole prompt (all three) chooses the tier."""
    uncached, read, written = (
        usage["input_tokens"],
        usage["cache_read_input_tokens"],
        usage["cache_creation_input_tokens"],
    )
    tokens = {"input": uncached, "cached_input": read, "cache_write": written, "output": usage["output_tokens"]}
    return priced(CLAUDE, CLAUDE_TIER, uncached + read + written, tokens)


def fault(cached: int, written: int, reasoning: int) -> dict[str, str]:
    """The mock's usage hook: how many prompt tokens it reports read from and written to the
    cache, and how many reasoning tokens it produces."""
    body = {"cached_tokens": cached, "cache_write_tokens": written, "reasoning_tokens": reasoning}
    return {"x-mock-fault": orjson.dumps(body).decode()}


async def chat_call(
    client: openai.AsyncOpenAI, stream: bool, long: bool, cached: int, written: int, reasoning: int
) -> dict:
    request = {"model": "chat-model", "messages": LONG if long else SHORT, "max_tokens": 12}
    headers = fault(cached, written, reasoning)
    if not stream:
        response = await client.chat.completions.create(**request, extra_headers=headers)
        assert response.usage is not None
        return response.usage.model_dump()
    chunks = await client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}, extra_headers=headers
    )
    usage = None
    async for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    assert usage is not None
    return usage


async def responses_call(
    client: openai.AsyncOpenAI, stream: bool, long: bool, cached: int, written: int, reasoning: int
) -> dict:
    request = {"model": "responses-model", "input": LONG if long else SHORT, "max_output_tokens": 12}
    headers = fault(cached, written, reasoning)
    if not stream:
        response = await client.responses.create(**request, extra_headers=headers)
        assert response.usage is not None
        return response.usage.model_dump()
    events = await client.responses.create(**request, stream=True, extra_headers=headers)
    usage = None
    async for event in events:
        if event.type in ("response.completed", "response.incomplete"):
            assert event.response.usage is not None
            usage = event.response.usage.model_dump()
    assert usage is not None
    return usage


async def messages_call(
    client: anthropic.AsyncAnthropic, stream: bool, long: bool, cached: int, written: int, reasoning: int
) -> dict:
    request = {"model": "claude-model", "messages": LONG if long else SHORT, "max_tokens": 12}
    headers = fault(cached, written, reasoning)
    if not stream:
        message = await client.messages.create(**request, extra_headers=headers)
        return message.usage.model_dump()
    async with client.messages.stream(**request, extra_headers=headers) as events:
        message = await events.get_final_message()  # message_start's usage updated by message_delta's
    return message.usage.model_dump()


async def traffic(url: str) -> dict[str, list[dict]]:
    """A day's mixed traffic on each API: 32 kinds of call (plain or streamed, short or long, with
    or without cache reads, cache writes and reasoning), three of each, all at once."""
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEYS["alice"], max_retries=0)
    claude = anthropic.AsyncAnthropic(base_url=url, api_key=KEYS["alice"], max_retries=0)
    mix = list(itertools.product([False, True], [False, True], [0, 3], [0, 2], [0, 4])) * 3
    calls = {
        "chat-model": [chat_call(oai, *kind) for kind in mix],
        "responses-model": [responses_call(oai, *kind) for kind in mix],
        "claude-model": [messages_call(claude, *kind) for kind in mix],
    }
    done = await asyncio.gather(*(call for api in calls.values() for call in api))
    await oai.close()
    await claude.close()
    return {model: done[i * len(mix) : (i + 1) * len(mix)] for i, model in enumerate(calls)}


INVOICES = {"chat-model": chat_invoice, "responses-model": responses_invoice, "claude-model": messages_invoice}


def token_classes(model: str, usage: dict) -> dict[str, int]:
    """The ledger's token classes of one call, from the usage its API reported."""
    if model == "chat-model":
        return {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": usage["prompt_tokens_details"]["cache_write_tokens"],
            "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"],
        }
    if model == "responses-model":
        return {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "cached_tokens": usage["input_tokens_details"]["cached_tokens"],
            "cache_write_tokens": usage["input_tokens_details"]["cache_write_tokens"],
            "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"],
        }
    written, read = usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]
    return {
        "prompt_tokens": usage["input_tokens"] + written + read,
        "completion_tokens": usage["output_tokens"],
        "cached_tokens": read,
        "cache_write_tokens": written,
        "reasoning_tokens": 0,  # Anthropic reports thinking inside output_tokens only
    }


def booked_models(url: str, calls: int) -> dict:
    """alice's ledger by model once all `calls` are booked (a stream settles after its last byte)."""
    deadline = time.monotonic() + 10
    while True:
        report = httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        models = report["teams"]["platform"]["keys"]["alice"]["models"]
        if sum(m["requests"] for m in models.values()) >= calls or time.monotonic() > deadline:
            return models
        time.sleep(0.05)


def test_the_ledger_books_exactly_what_the_invoice_charges(mock, tmp_path, redis_url):
    data = exact_store(config_dict(mock.base_url, redis_url=redis_url))
    data["upstreams"]["claude"] = {"base_url": mock.url, "api": "anthropic", "api_key": UPSTREAM_KEY, "timeout_s": 5}
    data["models"]["chat-model"]["price_per_mtok"] = {**BASE, "tiers": [TIER]}
    data["models"]["chat-model"]["context_window"] = 100_000
    data["models"]["responses-model"] = {
        "targets": [{"upstream": "mock", "model": "gpt-4o-mini"}],
        "price_per_mtok": {**BASE, "tiers": [TIER]},
    }
    data["models"]["claude-model"] = {
        "targets": [{"upstream": "claude", "model": "claude-sonnet-4-6"}],
        "price_per_mtok": {**CLAUDE, "tiers": [CLAUDE_TIER]},
    }
    replicas = start_proxies(write_config(tmp_path / "config.yaml", data), 1)
    try:
        usages = asyncio.run(traffic(replicas[0].url))
        models = booked_models(replicas[0].url, sum(len(calls) for calls in usages.values()))
        for model, calls in usages.items():
            classes = [token_classes(model, u) for u in calls]
            assert {c["prompt_tokens"] > 40 for c in classes} == {True, False}, model  # both tiers were used
            priced_apart = ("cached_tokens", "cache_write_tokens") + (
                ("reasoning_tokens",) if model != "claude-model" else ()
            )
            assert all(any(c[name] for c in classes) for name in priced_apart), model
            expected = sum(INVOICES[model](u) for u in calls)
            booked = models[model]
            print(f"invoice {model}: {len(calls)} calls, {expected} µ$ computed, {booked['spend_micros']} µ$ booked")
            assert booked["requests"] == len(calls)
            assert booked["spend_micros"] == expected, model
            for name in (
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cache_write_tokens",
                "reasoning_tokens",
            ):
                assert booked[name] == sum(c[name] for c in classes), (model, name)
    finally:
        stop_all(replicas)
