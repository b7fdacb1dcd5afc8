"""Budget-aware routing: a request whose budget refuses the expensive model's reservation but admits
the cheap one's is served by the cheap one (`on_budget_exhausted.fallback_model`), reserved, settled
and booked as it, with `x-proxy-fallback: budget` and the cheap model in the answer's `model`.

Real Redis, uvicorn on a port, the mock upstream, the OpenAI and Anthropic SDKs.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.support.configs import ADMIN_KEY, KEYS, UPSTREAM_KEY, make_config
from tests.support.errors import clocked, openai_error
from tests.support.metrics import samples

HI = [{"role": "user", "content": "hi"}]
# "hi" with max_tokens 10: 8 estimated prompt tokens + 10 = 18 tokens; at $100 / Mtok both ways the
# expensive model reserves 1,800 µ$, more than the $0.001 budget; chat-model ($0.27 / $1.10)
# reserves 14 µ$ and costs 11 µ$ (tests/test_budgets_e2e.py).
EXPENSIVE = {"input": "100", "output": "100"}
BUDGET_USD = "0.001"


def fallback_models(mock_url: str, scope: str = "key", budget: str = BUDGET_USD):
    def patch(data: dict) -> None:
        data["upstreams"]["claude"] = {
            "base_url": mock_url.removesuffix("/v1"),
            "api": "anthropic",
            "api_key": UPSTREAM_KEY,
            "max_retries": 0,
        }
        data["models"]["big-model"] = {
            "targets": [{"upstream": "mock", "model": "gpt-4o"}],
            "price_per_mtok": EXPENSIVE,
            "on_budget_exhausted": {"fallback_model": "chat-model"},
        }
        data["models"]["opus-model"] = {
            "targets": [{"upstream": "claude", "model": "claude-opus-4-1"}],
            "price_per_mtok": EXPENSIVE,
            "on_budget_exhausted": {"fallback_model": "claude-model"},
        }
        data["models"]["claude-model"] = {
            "targets": [{"upstream": "claude", "model": "claude-haiku-4-5"}],
            "price_per_mtok": {"input": "1", "output": "5"},
        }
        if scope == "key":
            data["keys"]["alice"]["daily_budget_usd"] = budget
        else:
            data["teams"]["platform"]["daily_budget_usd"] = budget
        data["keys"]["carol"]["models"] = ["big-model"]  # may not use the fallback
        data["keys"]["carol"]["daily_budget_usd"] = budget

    return patch


@pytest.fixture
def start(mock_upstream, start_proxy, redis_url):
    def started(**options):
        server, recorder = start_proxy(
            make_config(mock_upstream.url, redis_url=redis_url, patch=fallback_models(mock_upstream.url, **options))
        )
        server.recorder = recorder
        return server

    return started


def oai(server, key: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEYS[key], max_retries=0, timeout=10)


def alice_models(server) -> dict:
    server.wait_settled()
    usage = httpx.get(server.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    return usage.json()["teams"]["platform"]["keys"]["alice"]["models"]


def fallbacks(server) -> list[tuple[dict[str, str], float]]:
    return samples(httpx.get(server.url + "/metrics", timeout=10).text)["llm_proxy_budget_fallbacks_total"]


def sent_models(mock_upstream) -> list[str]:
    return [request["body"]["model"] for request in mock_upstream.requests]


@pytest.mark.parametrize("scope", ["key", "team"])
def test_chat_over_budget_on_the_expensive_model_is_served_by_the_cheap_one(start, mock_upstream, scope):
    server = start(scope=scope)
    plain = oai(server).chat.completions.with_raw_response.create(model="big-model", messages=HI, max_tokens=10)
    assert plain.headers["x-proxy-fallback"] == "budget"
    assert plain.parse().model == "gpt-4o-mini"  # the cheap model's target answered, and says so
    streamed = oai(server).chat.completions.with_raw_response.create(
        model="big-model", messages=HI, max_tokens=10, stream=True
    )
    assert streamed.headers["x-proxy-fallback"] == "budget"
    assert {chunk.model for chunk in streamed.parse()} == {"gpt-4o-mini"}
    assert sent_models(mock_upstream) == ["gpt-4o-mini"] * 2
    models = alice_models(server)
    assert set(models) == {"chat-model"}  # booked as the model that served it
    assert models["chat-model"]["requests"] == 2 and models["chat-model"]["spend_micros"] == 2 * 11
    assert [o.model for o in server.recorder.outcomes] == ["chat-model"] * 2
    assert fallbacks(server) == [({"model": "big-model", "fallback_model": "chat-model"}, 2)]


def test_within_budget_the_expensive_model_serves_and_no_header(start, mock_upstream):
    server = start(budget="1")
    reply = oai(server).chat.completions.with_raw_response.create(model="big-model", messages=HI, max_tokens=10)
    assert "x-proxy-fallback" not in reply.headers and reply.parse().model == "gpt-4o"
    assert set(alice_models(server)) == {"big-model"}
    assert fallbacks(server) == []


def test_when_neither_fits_the_usual_insufficient_quota(start, mock_upstream):
    server = start(budget="0.00001")  # 10 µ$: not even chat-model's 14 µ$ reservation fits
    with pytest.raises(openai.RateLimitError) as refused:
        oai(server).chat.completions.create(model="big-model", messages=HI, max_tokens=10)
    expected = openai_error(
        clocked("Key `alice` has spent $0.00 of its $0.00001 daily budget; it resets at {instant}."),
        "insufficient_quota",
        "insufficient_quota",
    )
    assert refused.value.response.json() == expected  # the refusal of the model asked for
    assert "x-proxy-fallback" not in refused.value.response.headers
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert mock_upstream.requests == []
    assert fallbacks(server) == []  # the fallback did not take it


def test_a_key_that_may_not_use_the_fallback_is_refused(start, mock_upstream):
    server = start()
    with pytest.raises(openai.RateLimitError) as refused:
        oai(server, "carol").chat.completions.create(model="big-model", messages=HI, max_tokens=10)
    assert refused.value.code == "insufficient_quota" and mock_upstream.requests == []


def test_responses_fall_back_plain_and_streamed(start, mock_upstream):
    server = start()
    plain = oai(server).responses.with_raw_response.create(model="big-model", input="hi", max_output_tokens=16)
    assert plain.headers["x-proxy-fallback"] == "budget" and plain.parse().model == "gpt-4o-mini"
    streamed = oai(server).responses.with_raw_response.create(
        model="big-model", input="hi", max_output_tokens=16, stream=True
    )
    assert streamed.headers["x-proxy-fallback"] == "budget"
    completed = [event.response for event in streamed.parse() if event.type == "response.completed"]
    assert [response.model for response in completed] == ["gpt-4o-mini"]
    models = alice_models(server)
    assert set(models) == {"chat-model"} and models["chat-model"]["requests"] == 2


def test_messages_fall_back_plain_and_streamed(start, mock_upstream):
    server = start()
    client = anthropic.Anthropic(base_url=server.url, api_key=KEYS["alice"], max_retries=0, timeout=10)
    plain = client.messages.with_raw_response.create(model="opus-model", max_tokens=16, messages=HI)
    assert plain.headers["x-proxy-fallback"] == "budget" and plain.parse().model == "claude-haiku-4-5"
    with client.messages.stream(model="opus-model", max_tokens=16, messages=HI) as stream:
        assert stream.response.headers["x-proxy-fallback"] == "budget"
        assert stream.get_final_message().model == "claude-haiku-4-5"
    assert sent_models(mock_upstream) == ["claude-haiku-4-5"] * 2
    models = alice_models(server)
    assert set(models) == {"claude-model"} and models["claude-model"]["requests"] == 2
    assert fallbacks(server) == [({"model": "opus-model", "fallback_model": "claude-model"}, 2)]
