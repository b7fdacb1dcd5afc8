from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from proxy.mock_upstream import MockUpstream
from tests.support.ports import free_port

MESSAGES = [{"role": "user", "content": "x" * 40}]  # 40 chars -> 10 prompt tokens
WORDS = " ".join(f"word{i}" for i in range(16))


@pytest.fixture(scope="module")
def mock():
    with MockUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def fresh(mock):
    mock.clear()


@pytest.fixture
def client(mock):
    with openai.OpenAI(base_url=mock.url, api_key="x", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def http(mock):
    with httpx.Client(base_url=mock.url.removesuffix("/v1"), timeout=5) as raw:
        yield raw


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kwargs)


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


def wait_for(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_url_and_port(mock):
    assert mock.port > 0
    assert mock.url == f"http://127.0.0.1:{mock.port}/v1"


def test_chat_completion_is_deterministic(client):
    reply = chat(client)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == WORDS
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 16, 26)
    assert usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize(
    ("kwargs", "words", "finish_reason"),
    [
        ({"max_tokens": 5}, 5, "length"),
        ({"max_completion_tokens": 3}, 3, "length"),
        ({"max_tokens": 16}, 16, "stop"),
        ({"max_tokens": 100}, 16, "stop"),
    ],
)
def test_max_tokens_caps_the_reply(client, kwargs, words, finish_reason):
    reply = chat(client, **kwargs)
    assert reply.choices[0].message.content.split() == WORDS.split()[:words]
    assert reply.choices[0].finish_reason == finish_reason
    assert reply.usage.completion_tokens == words


def test_n_choices_multiply_completion_tokens(client):
    reply = chat(client, n=3, max_tokens=4)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 12


def test_stream_without_usage(client):
    chunks = list(chat(client, stream=True))
    assert len(chunks) == 17  # 16 words + the final chunk
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == WORDS
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


def test_stream_with_usage(client, http):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=4))
    assert len(chunks) == 6  # 4 words, the final chunk, the usage chunk
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (10, 4)

    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        lines = sse_lines(response)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(event["usage"] is None for event in events[:-1])  # explicit null, as OpenAI sends


def test_completions_plain_and_stream(client):
    reply = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="abcdefgh", max_tokens=2)
    assert reply.id.startswith("cmpl-")
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "word0 word1"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 2)

    stream = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="abcd", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert len(chunks) == 18
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == WORDS
    assert chunks[-1].usage.completion_tokens == 16


def test_embeddings(client, http):
    single = client.embeddings.create(model="text-embedding-3-small", input="hello world!")
    batch = client.embeddings.create(model="text-embedding-3-small", input=["hello world!", "other"])
    assert len(single.data) == 1 and len(batch.data) == 2
    assert single.data[0].embedding == batch.data[0].embedding
    assert single.data[0].embedding != batch.data[1].embedding
    assert single.usage.prompt_tokens == single.usage.total_tokens == 3

    raw = http.post("/v1/embeddings", json={"model": "e", "input": "hello world!", "encoding_format": "float"})
    vector = raw.json()["data"][0]["embedding"]
    assert len(vector) == 8
    assert vector == pytest.approx(single.data[0].embedding, abs=1e-6)


def test_models(client):
    assert "gpt-4o-mini" in [model.id for model in client.models.list()]
    assert client.models.retrieve("anything").id == "anything"


def test_unknown_path_is_openai_shaped_404(http):
    response = http.post("/v1/nope", json={})
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_status_fault_with_retry_headers(mock, http, client):
    mock.add_faults([{"status": 429, "retry_after": "2", "retry_after_ms": "1500"}, {"status": 503}])
    response = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["retry-after-ms"] == "1500"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        chat(client)
    assert chat(client).choices  # the queue is empty again


def test_faults_via_control_endpoint(http, client):
    assert http.post("/_mock/faults", json=[{"status": 400}]).status_code == 200
    assert http.post("/_mock/faults", json=[{"stauts": 400}]).status_code == 400
    with pytest.raises(openai.BadRequestError):
        chat(client)
    http.post("/_mock/faults", json=[{"status": 500}])
    http.delete("/_mock/faults")
    assert chat(client).choices


def test_bad_fault_is_rejected(mock):
    with pytest.raises(ValueError, match="cut_after_chunk"):
        mock.add_faults([{"cut_after_chunk": 2}])
    with pytest.raises(ValueError, match="wrong type"):
        mock.add_faults([{"status": "429"}])


def test_cut_stream_raises_and_reports_nothing(mock, client):
    mock.add_faults([{"cut_after_chunks": 3}])
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in chat(client, stream=True, stream_options={"include_usage": True}):
            received.append(chunk)
    assert len(received) == 3
    stats = mock.stats()
    assert (stats["completion_tokens"], stats["streams_started"], stats["streams_completed"]) == (0, 1, 0)


def test_cut_plain_response_raises(mock, client):
    mock.add_faults([{"cut_after_chunks": 1}])
    with pytest.raises(openai.APIConnectionError):
        chat(client)
    assert mock.stats()["completion_tokens"] == 0


def test_malformed_json(mock, http):
    mock.add_faults([{"malformed_json": True}])
    response = http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


def test_bad_sse_line(mock, http):
    mock.add_faults([{"bad_sse_line": True, "chunks": 4}])
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = sse_lines(response)
    assert lines.index("data: not-json") == 2
    assert len(lines) == 4 + 1 + 1 + 1  # words, the bad line, the final chunk, [DONE]


def test_no_usage(mock, client):
    mock.add_faults([{"no_usage": True}, {"no_usage": True}])
    assert chat(client).usage is None
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) == 17
    assert all(chunk.usage is None for chunk in chunks)
    assert mock.stats()["prompt_tokens"] == 0


def test_close_connection(mock, client):
    mock.add_faults([{"close_connection": True}])
    with pytest.raises(openai.APIConnectionError):
        chat(client)


def test_first_byte_delay(mock, client):
    mock.add_faults([{"first_byte_delay_s": 0.2}])
    started = time.monotonic()
    chat(client)
    assert time.monotonic() - started >= 0.2


def test_header_fault_takes_precedence_over_queue(mock, client):
    mock.add_faults([{"status": 500}])
    fault = json.dumps({"status": 429, "retry_after": "1"})
    with pytest.raises(openai.RateLimitError) as raised:
        chat(client, extra_headers={"x-mock-fault": fault})
    assert raised.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):  # the queued fault is still there
        chat(client)


def test_request_log(mock, client, http):
    chat(client, max_tokens=2, extra_headers={"X-Custom": "yes"})
    logged = mock.requests
    assert len(logged) == 1
    entry = logged[0]
    assert (entry["method"], entry["path"]) == ("POST", "/v1/chat/completions")
    assert entry["headers"]["authorization"] == "Bearer x"
    assert entry["headers"]["x-custom"] == "yes"
    assert entry["body"]["max_tokens"] == 2
    assert isinstance(entry["time"], float)

    assert http.get("/_mock/requests").json()[0]["path"] == "/v1/chat/completions"
    http.delete("/_mock/requests")
    assert mock.requests == []


def test_stats_sum_reported_usage(mock, client, http):
    mock.add_faults([{"cached_tokens": 6, "usage_multiplier": 1.5}])
    first = chat(client, max_tokens=4)
    assert first.usage.completion_tokens == 6
    assert first.usage.prompt_tokens_details.cached_tokens == 6
    list(chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=2))
    list(chat(client, stream=True, max_tokens=2))  # asked for no usage: nothing reported
    assert http.get("/_mock/stats").json() == {
        "requests": 3,
        "prompt_tokens": 20,
        "completion_tokens": 8,
        "cached_tokens": 6,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "streams_started": 2,
        "streams_completed": 2,
        "streams_cancelled": 0,
        "rate_limited": 0,
    }
    http.delete("/_mock/stats")
    assert set(mock.stats().values()) == {0}


def test_client_going_away_counts_a_cancelled_stream(mock, http):
    fault = json.dumps({"chunk_delay_s": 0.05, "chunks": 40})
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-mock-fault": fault}) as response:
        next(response.iter_lines())
    wait_for(lambda: mock.stats()["streams_cancelled"] == 1)
    assert mock.stats()["streams_completed"] == 0


def test_chunk_delay_and_given_port():
    port = free_port()
    with MockUpstream(port=port, chunk_delay_s=0.02, chunks=5) as upstream:
        assert upstream.port == port
        with openai.OpenAI(base_url=upstream.url, api_key="x", max_retries=0) as sdk:
            started = time.monotonic()
            chunks = list(chat(sdk, stream=True))
            assert time.monotonic() - started >= 0.08
    assert len(chunks) == 6


def test_command_line():
    port = free_port()
    command = [sys.executable, "-m", "proxy.mock_upstream", "--port", str(port), "--chunks", "3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert f"127.0.0.1:{port}" in process.stdout.readline()
        body = {"model": "m", "messages": MESSAGES}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=5).json()
        assert reply["choices"][0]["message"]["content"] == "word0 word1 word2"
    finally:
        process.terminate()
        process.wait(timeout=5)
        process.stdout.close()


def test_a_quota_of_its_own_answers_429_past_it_and_shows_what_is_left(mock, http):
    """As a provider account does: each answer shows the requests left and when they come back;
    past the quota a 429 with retry-after, until the window resets."""
    assert http.post("/_mock/quota", json={"requests": 2, "window_s": 1}).json() == {"ok": True}
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES}
    first, second, third = (http.post("/v1/chat/completions", json=chat) for _ in range(3))
    assert (first.status_code, first.headers["x-ratelimit-remaining-requests"]) == (200, "1")
    assert (second.status_code, second.headers["x-ratelimit-remaining-requests"]) == (200, "0")
    assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limit_exceeded"
    assert 0 < int(third.headers["retry-after-ms"]) <= 1000 and third.headers["retry-after"] == "1"
    assert third.headers["x-ratelimit-limit-requests"] == "2"
    assert float(third.headers["x-ratelimit-reset-requests"].removesuffix("ms")) <= 1000
    anthropic = http.post(
        "/v1/messages",
        json={"model": "claude", "max_tokens": 5, "messages": MESSAGES},
        headers={"x-api-key": "x", "anthropic-version": "2023-06-01"},
    )
    assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
    assert anthropic.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert anthropic.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert mock.stats()["rate_limited"] == 2
    time.sleep(float(third.headers["retry-after-ms"]) / 1000 + 0.05)
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    assert http.post("/_mock/quota", json={"requests": -1}).status_code == 400
    http.delete("/_mock/quota")
    assert all(http.post("/v1/chat/completions", json=chat).status_code == 200 for _ in range(3))


def test_a_token_quota_counts_the_usage_it_reports_and_answers_429_past_it(mock, http):
    """Tokens per window as a provider's bucket: each answer's reported usage (prompt + completion,
    plain or streamed, chat or embeddings) comes off it, each answer shows what is left, and a
    request that does not fit is a 429 with the wait until it would."""
    assert http.post("/_mock/quota", json={"tokens": 60, "window_s": 600}).json() == {"ok": True}
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5}  # 10 + 5 tokens
    plain = http.post("/v1/chat/completions", json=chat)
    assert plain.json()["usage"]["total_tokens"] == 15
    assert (plain.headers["x-ratelimit-limit-tokens"], plain.headers["x-ratelimit-remaining-tokens"]) == ("60", "45")
    with http.stream(
        "POST", "/v1/chat/completions", json=chat | {"stream": True, "stream_options": {"include_usage": True}}
    ) as streamed:
        assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-tokens"] == "30"
        sse_lines(streamed)
    embedded = http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "y" * 80})
    assert embedded.json()["usage"]["total_tokens"] == 20
    assert embedded.headers["x-ratelimit-remaining-tokens"] == "10"
    assert "x-ratelimit-limit-requests" not in embedded.headers  # no request quota set
    refused = http.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    # 5 tokens missing at 60 per 600 s: 50 s (the bucket refilled a little meanwhile)
    assert 49_000 < int(refused.headers["retry-after-ms"]) <= 50_000
    assert refused.headers["retry-after"] == "50"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "10"
    small = http.post("/v1/chat/completions", json=chat | {"max_tokens": 0})  # 10 tokens still fit
    assert small.status_code == 200 and small.headers["x-ratelimit-remaining-tokens"] == "0"
    anthropic = http.post(
        "/v1/messages",
        json={"model": "claude", "max_tokens": 5, "messages": MESSAGES},
        headers={"x-api-key": "x", "anthropic-version": "2023-06-01"},
    )
    assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
    assert anthropic.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    assert anthropic.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
    assert int(anthropic.headers["retry-after"]) > 0 and "retry-after-ms" not in anthropic.headers
    assert mock.stats()["rate_limited"] == 2
    assert mock.stats()["prompt_tokens"] + mock.stats()["completion_tokens"] == 60  # the refused ones report none

    # a short window refills: 30 tokens a second
    assert http.post("/_mock/quota", json={"tokens": 30, "requests": 100, "window_s": 1}).json() == {"ok": True}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    again = http.post("/v1/chat/completions", json=chat)
    assert again.headers["x-ratelimit-remaining-requests"] == "98"
    late = http.post("/v1/chat/completions", json=chat)
    if late.status_code == 429:  # the 15 tokens had not come back yet: they have after retry-after-ms
        time.sleep(int(late.headers["retry-after-ms"]) / 1000 + 0.05)
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
    for bad in ({"tokens": -1}, {"tokens": 1.5}, {"window_s": 5}, {"tokens": True}):
        assert http.post("/_mock/quota", json=bad).status_code == 400, bad
    http.delete("/_mock/quota")
    assert all(http.post("/v1/chat/completions", json=chat).status_code == 200 for _ in range(5))
