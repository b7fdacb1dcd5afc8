"""The Responses and Anthropic Messages APIs (and Azure-style paths) through the proxy, by the
official SDKs: uvicorn on a real port, the mock upstream on another.

Each call is admitted, forwarded and settled as chat is: the usage the upstream reported is what
is charged (cache and reasoning tokens included), a cut stream is charged what it produced, and
every error on the Messages paths is Anthropic-shaped with Anthropic's headers.
"""

from __future__ import annotations

import json
import re
import time

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.support.configs import KEYS, UPSTREAM_KEY, make_config
from tests.support.errors import clocked

PROMPT = "x" * 40
MESSAGES = [{"role": "user", "content": PROMPT}]
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def agent_models(mock_url: str, **limits: object):
    def patch(data: dict) -> None:
        data["upstreams"]["claude"] = {
            "base_url": mock_url.removesuffix("/v1"),
            "api": "anthropic",
            "api_key": UPSTREAM_KEY,
            "max_retries": 2,
            "timeout_s": 5,
            "connect_timeout_s": 1,
        }
        data["models"]["claude-model"] = {
            "targets": [{"upstream": "claude", "model": "claude-sonnet-4-6"}],
            "price_per_mtok": {"input": "3", "output": "15", "cached_input": "0.3", "cache_write": "3.75"},
        }
        data["keys"]["alice"]["limits"] = dict(limits)

    return patch


@pytest.fixture
def proxy(mock_upstream, start_proxy):
    server, recorder = start_proxy(
        make_config(mock_upstream.url, patch=agent_models(mock_upstream.url, rpm=1000, tpm=1_000_000))
    )
    server.recorder = recorder
    return server


def outcomes(proxy, count: int, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while len([o for o in proxy.recorder.outcomes if o.finished_at]) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} requests finished")
        time.sleep(0.01)
    return proxy.recorder.outcomes


def fault(**fields: object) -> dict[str, str]:
    return {"x-mock-fault": json.dumps(fields)}


def oai(proxy, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=KEYS["alice"], max_retries=0, **kwargs)


def claude(proxy, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=KEYS["alice"], max_retries=max_retries)


# --- the Responses API ---------------------------------------------------------------------------


def test_responses_plain_is_charged_what_the_upstream_reported(proxy, mock_upstream):
    with oai(proxy) as sdk:
        reply = sdk.responses.with_raw_response.create(
            model="chat-model",
            input=PROMPT,
            instructions="be brief",
            extra_headers=fault(cached_tokens=4, reasoning_tokens=3),
        )
    response = reply.parse()
    assert response.output_text
    sent = mock_upstream.requests[-1]
    assert sent["body"]["model"] == "gpt-4o-mini"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEYS["alice"] not in orjson.dumps(sent).decode()
    (outcome,) = outcomes(proxy, 1)
    usage = response.usage
    assert outcome.endpoint == "responses"
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (usage.input_tokens, usage.output_tokens)
    assert (outcome.usage.cached_tokens, outcome.usage.reasoning_tokens) == (4, 3)
    assert outcome.cost_micros > 0


def test_responses_stream_passes_events_through_and_settles_the_final_usage(proxy, mock_upstream):
    with oai(proxy) as sdk:
        events = list(sdk.responses.create(model="chat-model", input=PROMPT, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reported = events[-1].response.usage
    (outcome,) = outcomes(proxy, 1)
    assert (outcome.usage.prompt_tokens, outcome.usage.completion_tokens) == (
        reported.input_tokens,
        reported.output_tokens,
    )
    assert "stream_options" not in mock_upstream.requests[-1]["body"]


def test_responses_stream_raw_bytes_are_the_upstreams(proxy, mock_upstream):
    body = {"model": "chat-model", "input": PROMPT, "stream": True}
    through = httpx.post(proxy.base_url + "/responses", json=body, headers={"authorization": f"Bearer {KEYS['alice']}"})
    direct = httpx.post(mock_upstream.url + "/responses", json=body | {"model": "gpt-4o-mini"})
    scrub = re.compile(r'"(id|created_at|completed_at|item_id)":("[^"]*"|\d+)')  # a second may pass between them
    assert scrub.sub("", through.text) == scrub.sub("", direct.text)
    assert through.text.count("event: ") == direct.text.count("event: ") > 10


def test_responses_stream_cut_ends_with_an_error_event_and_is_charged_what_was_produced(proxy):
    with oai(proxy) as sdk:
        stream = sdk.responses.create(
            model="chat-model", input=PROMPT, stream=True, extra_headers=fault(cut_after_chunks=6)
        )
        events = list(stream)
    assert events[-1].type == "error"
    assert events[-1].message == "The upstream stream was interrupted before it finished."
    assert events[-1].sequence_number == events[-2].sequence_number + 1
    (outcome,) = outcomes(proxy, 1)
    assert outcome.stream_error == "stream_cut"
    assert outcome.usage.completion_tokens > 0
    assert outcome.usage.prompt_tokens > 0


def test_background_responses_are_refused(proxy, mock_upstream):
    with oai(proxy) as sdk, pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model="chat-model", input=PROMPT, background=True)
    assert refused.value.body["param"] == "background"
    assert refused.value.body["type"] == "invalid_request_error"
    assert mock_upstream.requests == []


# --- the Anthropic Messages API ------------------------------------------------------------------


def test_messages_plain_with_anthropic_headers_and_upstream_credentials(proxy, mock_upstream):
    with claude(proxy) as sdk:
        reply = sdk.messages.with_raw_response.create(
            model="claude-model",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=fault(cached_tokens=5, cache_write_tokens=2) | {"anthropic-beta": "tools-2024"},
        )
    message = reply.parse()
    assert message.content[0].text
    headers = reply.headers
    assert headers["request-id"]
    for kind in ("requests", "tokens"):
        for field in ("limit", "remaining"):
            assert int(headers[f"anthropic-ratelimit-{kind}-{field}"]) >= 0
        assert RFC3339.match(headers[f"anthropic-ratelimit-{kind}-reset"])
    sent = mock_upstream.requests[-1]
    assert sent["path"].endswith("/v1/messages")
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY
    assert sent["headers"]["anthropic-beta"] == "tools-2024"
    assert sent["body"]["model"] == "claude-sonnet-4-6"
    assert KEYS["alice"] not in orjson.dumps(sent).decode()
    (outcome,) = outcomes(proxy, 1)
    usage = message.usage
    assert outcome.usage.prompt_tokens == usage.input_tokens + 5 + 2
    assert (outcome.usage.cached_tokens, outcome.usage.cache_write_tokens) == (5, 2)
    assert outcome.usage.completion_tokens == usage.output_tokens


def test_messages_key_as_x_api_key_and_default_version(proxy, mock_upstream):
    response = httpx.post(
        proxy.url + "/v1/messages",
        json={"model": "claude-model", "max_tokens": 32, "messages": MESSAGES},
        headers={"x-api-key": KEYS["alice"]},
    )
    assert response.status_code == 200, response.text
    sent = mock_upstream.requests[-1]
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["headers"]["x-api-key"] == UPSTREAM_KEY
    assert KEYS["alice"] not in orjson.dumps(sent).decode()


def test_messages_stream_passes_pings_and_settles_the_reported_usage(proxy):
    with claude(proxy) as sdk, sdk.messages.stream(model="claude-model", max_tokens=64, messages=MESSAGES) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and "content_block_delta" in kinds
    (outcome,) = outcomes(proxy, 1)
    assert outcome.usage.completion_tokens == final.usage.output_tokens
    assert outcome.usage.prompt_tokens == final.usage.input_tokens


def test_messages_stream_raw_events_include_ping(proxy):
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        json={"model": "claude-model", "max_tokens": 64, "messages": MESSAGES, "stream": True},
        headers={"x-api-key": KEYS["alice"]},
    ) as response:
        text = response.read().decode()
    assert response.headers["request-id"]
    names = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and "ping" in names and names[-1] == "message_stop"


def test_count_tokens_is_counted_not_charged(proxy, mock_upstream):
    with claude(proxy) as sdk:
        counted = sdk.messages.count_tokens(model="claude-model", messages=MESSAGES)
    assert counted.input_tokens > 0
    assert mock_upstream.requests[-1]["path"].endswith("/v1/messages/count_tokens")
    (outcome,) = outcomes(proxy, 1)
    assert outcome.endpoint == "count_tokens"
    assert (outcome.usage.prompt_tokens, outcome.cost_micros) == (0, 0)


def anthropic_reply(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) >= {"type", "error"} and body["type"] == "error"
    assert response.headers["request-id"]
    return response.status_code, body["error"]["type"], body["error"]["message"]


def test_messages_errors_are_anthropic_shaped(proxy, mock_upstream):
    url = proxy.url + "/v1/messages"
    good = {"x-api-key": KEYS["alice"]}
    assert anthropic_reply(httpx.post(url, json={"model": "claude-model"}, headers={"x-api-key": "nope"}))[:2] == (
        401,
        "authentication_error",
    )
    assert anthropic_reply(httpx.post(url, json={"model": "claude-model", "messages": MESSAGES}, headers=good)) == (
        400,
        "invalid_request_error",
        "max_tokens: Field required",
    )
    assert anthropic_reply(httpx.post(url, content=b"{", headers=good))[:2] == (400, "invalid_request_error")
    missing = {"model": "nope", "max_tokens": 5, "messages": MESSAGES}
    assert anthropic_reply(httpx.post(url, json=missing, headers=good))[:2] == (404, "not_found_error")
    bob = {"x-api-key": KEYS["bob"]}  # bob may use chat-model only
    allowed = {"model": "claude-model", "max_tokens": 5, "messages": MESSAGES}
    assert anthropic_reply(httpx.post(url, json=allowed, headers=bob))[:2] == (403, "permission_error")
    assert mock_upstream.requests == []


def test_a_model_of_the_other_api_is_refused_naming_the_endpoint(proxy, mock_upstream):
    wrong = httpx.post(
        proxy.url + "/v1/messages",
        json={"model": "chat-model", "max_tokens": 5, "messages": MESSAGES},
        headers={"x-api-key": KEYS["alice"]},
    )
    assert anthropic_reply(wrong) == (
        400,
        "invalid_request_error",
        "The model `chat-model` is served by the openai API: call it on /v1/chat/completions or /v1/responses.",
    )
    with oai(proxy) as sdk, pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="claude-model", messages=MESSAGES)
    assert refused.value.body["message"] == (
        "The model `claude-model` is served by the anthropic API: call it on /v1/messages."
    )
    assert mock_upstream.requests == []


def test_overloaded_529_is_retried_then_passed_on(proxy, mock_upstream):
    mock_upstream.add_faults([{"status": 529}] * 3)
    with claude(proxy) as sdk, pytest.raises(anthropic.APIStatusError) as failed:
        sdk.messages.create(model="claude-model", max_tokens=5, messages=MESSAGES)
    assert failed.value.status_code == 529
    assert failed.value.body["error"]["type"] == "overloaded_error"
    assert len(mock_upstream.requests) == 3  # max_retries: 2


def test_overloaded_then_answered(proxy, mock_upstream):
    mock_upstream.add_faults([{"status": 529}])
    with claude(proxy) as sdk:
        assert sdk.messages.create(model="claude-model", max_tokens=5, messages=MESSAGES).content


# --- Azure-style paths and the unmetered-path rule -----------------------------------------------


def test_azure_clients_are_served_as_chat_and_embeddings(proxy, mock_upstream):
    with openai.AzureOpenAI(
        azure_endpoint=proxy.url, api_key=KEYS["alice"], api_version="2024-10-21", max_retries=0
    ) as azure:
        chat = azure.chat.completions.create(model="chat-model", messages=MESSAGES)
        embedded = azure.embeddings.create(model="embed-model", input="hello")
    assert chat.choices[0].message.content and embedded.data[0].embedding
    assert [r["body"]["model"] for r in mock_upstream.requests] == ["gpt-4o-mini", "text-embedding-3-small"]
    assert [o.endpoint for o in outcomes(proxy, 2)] == ["chat", "embeddings"]


@pytest.mark.parametrize(
    "path", ["/v1/assistants", "/v1/files", "/v1/responses/x/y/z", "/openai/deployments/d/images/generations"]
)
def test_no_unmetered_path(proxy, mock_upstream, path):
    response = httpx.post(proxy.url + path, json={"model": "chat-model"}, headers={"api-key": KEYS["alice"]})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == f"Unknown request URL: POST {path}."
    assert mock_upstream.requests == []


def test_a_key_in_x_api_key_never_reaches_an_openai_upstream(proxy, mock_upstream):
    response = httpx.post(
        proxy.base_url + "/chat/completions",
        json={"model": "chat-model", "messages": MESSAGES},
        headers={"x-api-key": KEYS["alice"]},
    )
    assert response.status_code == 200
    assert KEYS["alice"] not in orjson.dumps(mock_upstream.requests[-1]).decode()


def test_anthropic_sdk_retries_a_rate_limit_refusal(mock_upstream, start_proxy):
    # 1 request a second, a burst of 1: the second call is refused, waits ~1 s (retry-after-ms) and
    # passes (at 10 a second, a second call sent 100 ms late on a loaded machine was not refused)
    config = make_config(mock_upstream.url, patch=agent_models(mock_upstream.url, rpm=60, rpm_burst=1))
    server, recorder = start_proxy(config)
    with claude(server, max_retries=3) as sdk:
        for _ in range(2):
            assert sdk.messages.create(model="claude-model", max_tokens=5, messages=MESSAGES).content
    server.recorder = recorder
    statuses = [o.status for o in outcomes(server, 3)]  # settled (and reported) after the last byte
    assert statuses.count(200) == 2 and 429 in statuses
    refused = httpx.post(
        server.url + "/v1/messages",
        json={"model": "claude-model", "max_tokens": 5, "messages": MESSAGES},
        headers={"x-api-key": KEYS["alice"]},
    )
    if refused.status_code == 429:  # not when the bucket refilled meanwhile
        assert anthropic_reply(refused)[:2] == (429, "rate_limit_error")
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert RFC3339.match(refused.headers["anthropic-ratelimit-requests-reset"])


def test_anthropic_sdk_does_not_retry_a_budget_refusal(mock_upstream, start_proxy):
    # 64 output tokens at $15/Mtok reserve 960 µ$: more than the key's 100 µ$ budget
    def patch(data: dict) -> None:
        agent_models(mock_upstream.url)(data)
        data["keys"]["alice"]["daily_budget_usd"] = "0.0001"

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
    with claude(server, max_retries=3) as sdk, pytest.raises(anthropic.RateLimitError) as refused:
        sdk.messages.create(model="claude-model", max_tokens=64, messages=MESSAGES)
    assert refused.value.body["error"]["type"] == "rate_limit_error"
    assert refused.value.body["error"]["message"] == clocked(
        "Key `alice` has spent $0.00 of its $0.0001 daily budget; it resets at {instant}."
    )
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(recorder.outcomes) == 1, "the SDK retried a budget refusal"
    assert mock_upstream.requests == []


# --- stored responses: only the creating team, at the creating upstream --------------------------


def test_stored_responses_are_served_to_the_creating_team_only(proxy, mock_upstream):
    with oai(proxy) as sdk:
        created = sdk.responses.with_raw_response.create(model="chat-model", input=PROMPT)
        response = created.parse()
        read = sdk.responses.with_raw_response.retrieve(response.id)
        assert read.parse().id == response.id
        assert read.headers["x-ratelimit-limit-requests"] == created.headers["x-ratelimit-limit-requests"]
        items = sdk.responses.input_items.list(response.id)
        assert items.data
        assert sdk.responses.cancel(response.id).id == response.id
    with openai.OpenAI(base_url=proxy.base_url, api_key=KEYS["bob"], max_retries=0) as same_team:
        assert same_team.responses.retrieve(response.id).id == response.id
    sent = mock_upstream.requests[-1]
    assert sent["method"] == "GET" and sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    before = len(mock_upstream.requests)
    with openai.OpenAI(base_url=proxy.base_url, api_key=KEYS["carol"], max_retries=0) as other_team:
        for attempt in (
            lambda: other_team.responses.retrieve(response.id),
            lambda: other_team.responses.delete(response.id),
            lambda: other_team.responses.input_items.list(response.id),
            lambda: other_team.responses.create(model="chat-model", input="more", previous_response_id=response.id),
            lambda: other_team.responses.retrieve("resp_never_seen"),
        ):
            with pytest.raises(openai.NotFoundError) as missing:
                attempt()
            assert missing.value.body["message"] in (
                f"No response found with id '{response.id}'.",
                "No response found with id 'resp_never_seen'.",
            )
    assert len(mock_upstream.requests) == before, "another team's call reached the upstream"
    with oai(proxy) as sdk:
        sdk.responses.delete(response.id)
    reads = [o for o in outcomes(proxy, 10) if o.endpoint == "responses"]
    assert all(o.cost_micros == 0 for o in reads[1:])


def test_a_streamed_response_can_be_read_back_at_once(proxy):
    with oai(proxy) as sdk:
        events = list(sdk.responses.create(model="chat-model", input=PROMPT, stream=True))
        created = events[-1].response
        assert sdk.responses.retrieve(created.id).id == created.id


def test_store_false_responses_are_not_remembered(proxy, mock_upstream):
    with oai(proxy) as sdk:
        response = sdk.responses.create(model="chat-model", input=PROMPT, store=False)
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.responses.retrieve(response.id)
    assert missing.value.body["message"] == f"No response found with id '{response.id}'."  # the proxy's
    assert len(mock_upstream.requests) == 1


def test_previous_response_id_goes_to_the_target_that_created_it(mock_upstream, start_proxy):
    from proxy.mock_upstream import MockUpstream

    with MockUpstream() as backup:
        config = make_config(mock_upstream.url, second_upstream=backup.url)
        server, _ = start_proxy(config)
        mock_upstream.add_faults([{"status": 500}] * 3)  # the first target fails: the fallback creates it
        with oai(server) as sdk:
            first = sdk.responses.create(model="chat-model", input=PROMPT)
            assert backup.requests[-1]["body"]["model"] == "gpt-4o"
            mock_upstream.clear()
            second = sdk.responses.create(model="chat-model", input="and then?", previous_response_id=first.id)
        assert second.output_text
        assert mock_upstream.requests == []
        assert backup.requests[-1]["body"]["previous_response_id"] == first.id
        assert backup.requests[-1]["body"]["model"] == "gpt-4o"


def test_reads_of_stored_responses_count_in_the_request_bucket(mock_upstream, start_proxy):
    server, recorder = start_proxy(make_config(mock_upstream.url, patch=agent_models(mock_upstream.url, rpm=2)))
    with oai(server) as sdk:
        response = sdk.responses.create(model="chat-model", input=PROMPT)
        sdk.responses.retrieve(response.id)
        with pytest.raises(openai.RateLimitError):
            sdk.responses.retrieve(response.id)
    server.recorder = recorder
    assert [o.cost_micros for o in outcomes(server, 3)][1:] == [0, 0]


def test_openai_agents_sdk_with_its_default_model(mock_upstream, start_proxy):
    from agents import Agent, RunConfig, Runner
    from agents.models import get_default_model
    from agents.models.openai_provider import OpenAIProvider

    default = get_default_model()

    def patch(data: dict) -> None:  # the SDK's default model, as an operator would configure it
        data["models"][default] = {"targets": [{"upstream": "mock", "model": "gpt-4o-mini"}]}

    server, recorder = start_proxy(make_config(mock_upstream.url, patch=patch))
    server.recorder = recorder
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEYS["alice"], max_retries=0)
    provider = OpenAIProvider(openai_client=client, use_responses=True)
    result = Runner.run_sync(
        Agent(name="helper", instructions="Answer briefly."),
        "say hi",
        run_config=RunConfig(model_provider=provider, tracing_disabled=True),
    )
    assert result.final_output.startswith("word0")
    (outcome,) = outcomes(server, 1)
    assert (outcome.endpoint, outcome.model, outcome.stream) == ("responses", default, False)
    assert outcome.usage.completion_tokens > 0
    assert mock_upstream.requests[-1]["path"] == "/v1/responses"


def test_requests_are_counted_by_endpoint(proxy):
    from tests.support.metrics import samples

    with claude(proxy) as sdk:
        sdk.messages.create(model="claude-model", max_tokens=5, messages=MESSAGES)
        sdk.messages.count_tokens(model="claude-model", messages=MESSAGES)
    with oai(proxy) as sdk:
        sdk.responses.create(model="chat-model", input=PROMPT)
        sdk.chat.completions.create(model="chat-model", messages=MESSAGES)
    outcomes(proxy, 4)
    found = samples(httpx.get(proxy.url + "/metrics").text)["llm_proxy_requests_total"]
    counted = {(labels["endpoint"], labels["model"], labels["status"]): value for labels, value in found}
    assert counted == {
        ("messages", "claude-model", "200"): 1.0,
        ("count_tokens", "claude-model", "200"): 1.0,
        ("responses", "chat-model", "200"): 1.0,
        ("chat", "chat-model", "200"): 1.0,
    }


def test_messages_upstream_failure_is_an_anthropic_api_error(proxy, mock_upstream):
    mock_upstream.add_faults([{"close_connection": True}] * 3)
    with claude(proxy) as sdk, pytest.raises(anthropic.APIStatusError) as failed:
        sdk.messages.create(model="claude-model", max_tokens=5, messages=MESSAGES)
    assert failed.value.status_code == 502
    assert failed.value.body["error"] == {
        "type": "api_error",
        "message": "The upstream failed: upstream 'claude' broke the connection.",
    }
    assert failed.value.response.headers["request-id"]
    assert RFC3339.match(failed.value.response.headers["anthropic-ratelimit-tokens-reset"])
    (outcome,) = outcomes(proxy, 1)
    assert outcome.cost_micros == 0


def test_messages_stream_cut_ends_with_an_anthropic_error_event(proxy):
    with httpx.stream(
        "POST",
        proxy.url + "/v1/messages",
        json={"model": "claude-model", "max_tokens": 64, "messages": MESSAGES, "stream": True},
        headers={"x-api-key": KEYS["alice"], **fault(cut_after_chunks=5)},
    ) as response:
        text = response.read().decode()
    last = text.rstrip("\n").split("\n\n")[-1]
    assert last == (
        'event: error\ndata: {"type":"error","error":{"type":"api_error",'
        '"message":"The upstream stream was interrupted before it finished."}}'
    )
    (outcome,) = outcomes(proxy, 1)
    assert outcome.stream_error == "stream_cut" and outcome.usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/v1/messages", 405), ("POST", "/v1/messages/batches", 404)]
)
def test_other_calls_under_messages_are_anthropic_shaped(proxy, mock_upstream, method, path, status):
    response = httpx.request(method, proxy.url + path, headers={"x-api-key": KEYS["alice"]})
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    assert anthropic_reply(response)[:2] == (status, kind)
    assert mock_upstream.requests == []
