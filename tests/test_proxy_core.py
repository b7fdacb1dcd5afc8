"""The core through real parts: uvicorn on a port, the mock upstream on another, the OpenAI SDK."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest

from tests.support.configs import KEYS, UPSTREAM_KEY, make_config
from tests.support.errors import INVALID, NO_KEY, WRONG_KEY, error_reply, openai_error


@pytest.fixture
def proxy(mock_upstream, start_proxy):
    server, recorder = start_proxy(make_config(mock_upstream.url))
    server.recorder = recorder
    return server


def client(proxy, key="alice", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=KEYS[key], max_retries=0, **kwargs)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def settled(proxy, count):
    wait_for(lambda: len([o for o in proxy.recorder.outcomes if o.finished_at]) >= count)
    return proxy.recorder.outcomes


def test_chat_plain_rewrites_model_and_swaps_keys(proxy, mock_upstream):
    with client(proxy) as sdk:
        reply = sdk.chat.completions.with_raw_response.create(
            model="chat-model", messages=[{"role": "user", "content": "Hello there"}]
        )
    completion = reply.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0
    assert reply.headers["x-request-id"]
    sent = mock_upstream.requests[-1]
    assert sent["body"]["model"] == "gpt-4o-mini"
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEYS["alice"] not in orjson.dumps(sent).decode()
    assert UPSTREAM_KEY not in reply.http_response.text
    assert UPSTREAM_KEY not in str(dict(reply.headers))
    outcome = settled(proxy, 1)[0]
    assert outcome.usage.completion_tokens == completion.usage.completion_tokens
    assert outcome.usage.prompt_tokens == completion.usage.prompt_tokens


def test_request_id_passes_through(proxy, mock_upstream):
    response = httpx.post(
        proxy.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {KEYS['alice']}", "x-request-id": "my-trace-42"},
        json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "my-trace-42"
    assert mock_upstream.requests[-1]["headers"]["x-request-id"] == "my-trace-42"


def test_api_key_header_is_accepted(proxy):
    response = httpx.post(
        proxy.base_url + "/chat/completions",
        headers={"api-key": KEYS["alice"]},
        json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 200


async def test_async_sdk_chat_and_stream(proxy):
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=KEYS["alice"], max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "async hello"}]
        )
        assert completion.choices[0].message.content
        stream = await sdk.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "async stream"}], stream=True
        )
        words = [
            chunk.choices[0].delta.content async for chunk in stream if chunk.choices and chunk.choices[0].delta.content
        ]
    assert len(words) == 16


def test_stream_relays_chunks_as_they_arrive(mock_upstream, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url))
    fault = orjson.dumps({"chunk_delay_s": 0.15, "chunks": 6}).decode()
    with client(server, default_headers={"x-mock-fault": fault}) as sdk:
        stream = sdk.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "s"}], stream=True
        )
        first = next(iter(stream))
        assert mock_upstream.stats()["streams_completed"] == 0, "first chunk arrived only after the whole stream"
        rest = list(stream)
    assert first.choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in [first, *rest])
    contents = [c.choices[0].delta.content for c in [first, *rest] if c.choices and c.choices[0].delta.content]
    assert len(contents) == 6


def test_stream_usage_captured_and_hidden_unless_asked(proxy, mock_upstream):
    with client(proxy) as sdk:
        hidden = list(
            sdk.chat.completions.create(
                model="chat-model", messages=[{"role": "user", "content": "count me"}], stream=True
            )
        )
        shown = list(
            sdk.chat.completions.create(
                model="chat-model",
                messages=[{"role": "user", "content": "count me"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert all(chunk.choices for chunk in hidden), "the usage-only chunk leaked to a client that did not ask"
    assert shown[-1].usage is not None and shown[-1].choices == []
    # the proxy asked the upstream for usage both times
    assert all(r["body"]["stream_options"]["include_usage"] for r in mock_upstream.requests)
    outcomes = settled(proxy, 2)
    assert outcomes[0].usage.completion_tokens == shown[-1].usage.completion_tokens == 16
    assert outcomes[1].usage.prompt_tokens == shown[-1].usage.prompt_tokens


def test_raw_stream_ends_with_done(proxy):
    with httpx.stream(
        "POST",
        proxy.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
        json={"model": "chat-model", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body


def test_completions_embeddings_and_models(proxy):
    with client(proxy) as sdk:
        text = sdk.completions.create(model="text-model", prompt="Say this is a test", max_tokens=5)
        assert text.choices[0].text and text.usage.completion_tokens == 5
        streamed = list(sdk.completions.create(model="text-model", prompt="stream", stream=True, max_tokens=3))
        assert "".join(c.choices[0].text for c in streamed if c.choices).strip()
        embedding = sdk.embeddings.create(model="embed-model", input=["one", "two"])
        assert len(embedding.data) == 2 and embedding.usage.prompt_tokens > 0
        names = sorted(model.id for model in sdk.models.list())
        assert names == ["chat-model", "embed-model", "small-model", "text-model"]
        assert sdk.models.retrieve("chat-model").id == "chat-model"
    with client(proxy, "bob") as sdk:
        assert [m.id for m in sdk.models.list()] == ["chat-model"]
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("text-model")


def post(proxy, body, key="alice", content=None, headers=None):
    merged = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
    merged.update(headers or {})
    if content is not None:
        return httpx.post(proxy.base_url + "/chat/completions", content=content, headers=merged)
    return httpx.post(proxy.base_url + "/chat/completions", json=body, headers=merged)


CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}


NOT_JSON = (
    "We could not parse the JSON body of your request: the body is not valid {}. (HINT: This likely means "
    "you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
)


@pytest.mark.parametrize(
    "body, content, status, message, code, param",
    [
        (None, b"{not json", 400, NOT_JSON.format("JSON"), None, None),
        (
            None,
            b'{"model": "chat-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            400,
            NOT_JSON.format("UTF-8"),
            None,
            None,
        ),
        (None, b"[1, 2]", 400, "The JSON body of your request must be an object.", None, None),
        (None, b"", 400, "We could not parse the JSON body of your request: the body is empty.", None, None),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            None,
            400,
            "you must provide a model parameter",
            "missing_required_parameter",
            "model",
        ),
        (
            {"model": 42, "messages": []},
            None,
            400,
            "Invalid type for 'model': expected a string, but got a number instead.",
            "invalid_type",
            "model",
        ),
        (
            {"model": "chat-model"},
            None,
            400,
            "Missing required parameter: 'messages'.",
            "missing_required_parameter",
            "messages",
        ),
        (
            {"model": "chat-model", "messages": "hi"},
            None,
            400,
            "Invalid type for 'messages': expected an array, but got a string instead.",
            "invalid_type",
            "messages",
        ),
        (
            {**CHAT, "max_tokens": -5},
            None,
            400,
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got -5 instead.",
            "integer_below_min_value",
            "max_tokens",
        ),
        (
            {**CHAT, "max_tokens": 1.5},
            None,
            400,
            "Invalid type for 'max_tokens': expected an integer, but got a number instead.",
            "invalid_type",
            "max_tokens",
        ),
        (
            {**CHAT, "max_tokens": True},
            None,
            400,
            "Invalid type for 'max_tokens': expected an integer, but got a boolean instead.",
            "invalid_type",
            "max_tokens",
        ),
        (
            {**CHAT, "stream": "yes"},
            None,
            400,
            "Invalid type for 'stream': expected a boolean, but got a string instead.",
            "invalid_type",
            "stream",
        ),
        (
            {**CHAT, "n": 0},
            None,
            400,
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
            "integer_below_min_value",
            "n",
        ),
        (
            {**CHAT, "model": "no-such-model"},
            None,
            404,
            "The model `no-such-model` does not exist or you do not have access to it.",
            "model_not_found",
            "model",
        ),
    ],
)
def test_bad_requests_are_openai_shaped(proxy, body, content, status, message, code, param):
    response = post(proxy, body, content=content)
    assert error_reply(response) == (status, openai_error(message, INVALID, code, param))


def test_auth_errors(proxy):
    for headers, message in (
        ({}, NO_KEY),
        ({"Authorization": "Bearer sk-wrong"}, WRONG_KEY),
        ({"Authorization": "Basic abc"}, NO_KEY),
    ):
        response = post(proxy, CHAT, key=None, headers=headers)
        assert error_reply(response) == (401, openai_error(message, INVALID, "invalid_api_key"))
    with (
        openai.OpenAI(base_url=proxy.base_url, api_key="sk-wrong", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError),
    ):
        sdk.chat.completions.create(**CHAT)


def test_model_not_allowed(proxy):
    response = post(proxy, {**CHAT, "model": "text-model", "prompt": "x"}, key="bob")
    assert error_reply(response) == (
        403,
        openai_error("This key is not allowed to use the model `text-model`.", INVALID, "model_not_allowed", "model"),
    )


def test_body_too_large(mock_upstream, start_proxy):
    server, _ = start_proxy(make_config(mock_upstream.url, patch=lambda d: d.update(max_body_bytes=1000)))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    too_large = (
        413,
        openai_error("Request body is larger than the proxy's limit of 1000 bytes.", INVALID, "request_too_large"),
    )
    response = post(server, big)
    assert error_reply(response) == too_large

    def chunked():
        yield b'{"model": "chat-model", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"y" * 100
        yield b'"}]}'

    response = httpx.post(
        server.base_url + "/chat/completions", content=chunked(), headers={"Authorization": f"Bearer {KEYS['alice']}"}
    )
    assert error_reply(response) == too_large


def test_context_window(proxy, mock_upstream):
    long = {"model": "chat-model", "max_tokens": 1000, "messages": [{"role": "user", "content": "w" * 16000}]}
    response = post(proxy, long)
    assert error_reply(response) == (
        400,
        openai_error(
            "This model's maximum context length is 4096 tokens. However, you requested about 5007 tokens (4007 in the "
            "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
            INVALID,
            "context_length_exceeded",
            "messages",
        ),
    )
    requests_before = len(mock_upstream.requests)
    truncating = {
        "model": "small-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "old " * 60},
            {"role": "assistant", "content": "older answer " * 20},
            {"role": "user", "content": "latest question"},
        ],
    }
    response = post(proxy, truncating)
    assert response.status_code == 200, response.text
    sent = mock_upstream.requests[requests_before]["body"]["messages"]
    assert [m["content"] for m in sent] == ["be brief", "latest question"]


def test_unknown_route_and_method(proxy):
    response = httpx.get(proxy.base_url + "/nothing-here", headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert error_reply(response) == (
        404,
        openai_error("Unknown request URL: GET /v1/nothing-here.", INVALID, "not_found"),
    )
    response = httpx.get(proxy.base_url + "/chat/completions")
    assert error_reply(response) == (
        405,
        openai_error("Method GET is not allowed for /v1/chat/completions.", INVALID, "method_not_allowed"),
    )


def test_upstream_4xx_passes_through_unchanged(proxy, mock_upstream):
    mock_upstream.add_faults([{"status": 400}])
    response = post(proxy, CHAT)
    assert error_reply(response) == (400, openai_error("mock fault: status 400", INVALID, None))  # the mock's own


def test_retry_then_success(proxy, mock_upstream):
    mock_upstream.add_faults([{"status": 503, "retry_after_ms": "10"}, {"status": 429, "retry_after_ms": "10"}])
    with client(proxy) as sdk:
        completion = sdk.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content
    assert len(mock_upstream.requests) == 3
    assert settled(proxy, 1)[0].attempts.retries == 2


def test_retry_exhausted_gives_502(proxy, mock_upstream):
    mock_upstream.add_faults([{"status": 500, "retry_after_ms": "5"}] * 3)
    response = post(proxy, CHAT)
    assert error_reply(response) == (
        502,
        openai_error("The upstream failed: upstream 'mock' answered 500.", "server_error", "upstream_error"),
    )
    assert len(mock_upstream.requests) == 3


def test_fallback_to_second_target(start_proxy):
    from proxy.mock_upstream import MockUpstream

    with MockUpstream() as primary, MockUpstream() as backup:
        server, _ = start_proxy(make_config(primary.url, second_upstream=backup.url))
        primary.add_faults([{"status": 503, "retry_after_ms": "5"}] * 3)
        with client(server) as sdk:
            completion = sdk.chat.completions.create(**CHAT)
        assert completion.choices[0].message.content
        assert len(primary.requests) == 3
        assert backup.requests[0]["body"]["model"] == "gpt-4o"


def test_connection_refused_falls_back_then_502(start_proxy):
    from proxy.mock_upstream import MockUpstream
    from tests.support.ports import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with MockUpstream() as backup:
        server, _ = start_proxy(make_config(dead, second_upstream=backup.url))
        with client(server) as sdk:
            assert sdk.chat.completions.create(**CHAT).choices
    server, _ = start_proxy(make_config(dead))
    response = post(server, CHAT)
    assert error_reply(response) == (
        502,
        openai_error("The upstream failed: could not connect to upstream 'mock'.", "server_error", "upstream_error"),
    )


def test_read_timeout_gives_504(mock_upstream, start_proxy):
    def patch(data):
        data["upstreams"]["mock"].update(timeout_s=0.3, max_retries=0)

    server, _ = start_proxy(make_config(mock_upstream.url, patch=patch))
    mock_upstream.add_faults([{"first_byte_delay_s": 1.0}])
    response = post(server, CHAT)
    assert error_reply(response) == (
        504,
        openai_error(
            "The upstream did not answer in time (upstream 'mock' timed out).", "server_error", "upstream_timeout"
        ),
    )


def test_stream_cut_midway_gets_error_event(proxy, mock_upstream):
    mock_upstream.add_faults([{"cut_after_chunks": 3}])
    with httpx.stream(
        "POST",
        proxy.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
        json={**CHAT, "stream": True},
    ) as response:
        body = response.read()
    events = [e for e in body.split(b"\n\n") if e]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last == openai_error(
        "The upstream stream was interrupted before it finished.", "server_error", "upstream_error"
    )
    assert b"[DONE]" not in body
    outcome = settled(proxy, 1)[0]
    assert outcome.stream_error == "stream_cut"


async def test_client_disconnect_cancels_upstream(proxy, mock_upstream):
    fault = orjson.dumps({"chunk_delay_s": 0.3, "chunks": 20}).decode()
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "x-mock-fault": fault}
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST", proxy.base_url + "/chat/completions", headers=headers, json={**CHAT, "stream": True}
        ) as response,
    ):
        async for _ in response.aiter_bytes():
            break  # leave after the first chunk
    deadline = time.monotonic() + 3
    while mock_upstream.stats()["streams_cancelled"] < 1:
        assert time.monotonic() < deadline, mock_upstream.stats()
        await asyncio.sleep(0.02)
    assert mock_upstream.stats()["streams_completed"] == 0
    outcome = settled(proxy, 1)[0]
    assert outcome.client_gone


def test_health_and_ready(proxy):
    assert httpx.get(proxy.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(proxy.url + "/readyz").status_code == 200


def test_truncation_keeps_the_estimate_consistent_over_many_messages(mock_upstream, start_proxy):
    """Dropping old messages one by one: the prompt estimate after truncation is the estimate of
    what is sent (computed incrementally, not by re-estimating the whole body per message)."""
    from proxy.tokens import estimate_prompt_tokens

    server, _ = start_proxy(
        make_config(mock_upstream.url, patch=lambda d: d["models"]["small-model"].update(context_window=2000))
    )
    messages = [{"role": "system", "content": "be brief"}]
    messages += [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " * 3} for i in range(20_000)]
    messages.append({"role": "user", "content": "the latest question"})
    response = post(server, {"model": "small-model", "messages": messages})
    assert response.status_code == 200, response.text
    sent = mock_upstream.requests[-1]["body"]
    assert sent["messages"][0]["content"] == "be brief" and sent["messages"][-1]["content"] == "the latest question"
    assert estimate_prompt_tokens("chat", sent) + 16 <= 2000  # 16: the model's default_max_tokens
    assert len(sent["messages"]) > 50


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_refusing_the_proxys_credentials_is_a_502(proxy, mock_upstream, status):
    mock_upstream.add_faults([{"status": status}])
    response = post(proxy, CHAT)
    assert error_reply(response) == (
        502,
        openai_error(
            "The upstream failed: upstream 'mock' refused the proxy's credentials.", "server_error", "upstream_error"
        ),
    )
    assert len(mock_upstream.requests) == 1  # not retried: the same key would be refused again
