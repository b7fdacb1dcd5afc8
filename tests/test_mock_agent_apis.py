"""The mock upstream's Responses and Anthropic Messages APIs, read by the official SDKs.

Every reply must parse in the SDK without errors, events come in the references' order with
their `event:` lines, and a streamed reply reports exactly the usage of the same request plain.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2
import openai
import pytest

from proxy.mock_upstream import MockUpstream

WORDS = " ".join(f"word{i}" for i in range(16))
PROMPT = "x" * 40  # 10 tokens for the mock
MESSAGES = [{"role": "user", "content": PROMPT}]
RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 16,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
MESSAGE_EVENTS = [
    "message_start",
    "content_block_start",
    "ping",
    *["content_block_delta"] * 16,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture(scope="module")
def mock():
    with MockUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def fresh(mock):
    mock.clear()


@pytest.fixture
def oai(mock):
    with openai.OpenAI(base_url=mock.url, api_key="x", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def claude(mock):
    with anthropic.Anthropic(base_url=mock.url.removesuffix("/v1"), api_key="k", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def http(mock):
    with httpx.Client(base_url=mock.url.removesuffix("/v1"), timeout=5) as raw:
        yield raw


def fault(**fields) -> dict[str, str]:
    return {"x-mock-fault": json.dumps(fields)}


def raw_events(http: httpx.Client, path: str, body: dict, headers: dict[str, str] | None = None) -> list[dict]:
    """Each event as {"event": name, "data": payload}, checking every event names its data's type."""
    with http.stream("POST", path, json=body | {"stream": True}, headers=headers or {}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        text = response.read().decode()
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: ")
        events.append(payload)
    return events


ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


# --- the Responses API ---------------------------------------------------------------------------


def test_response_plain(oai):
    response = oai.responses.create(model="gpt-4o-mini", input=PROMPT, instructions="abcd")
    assert response.id.startswith("resp_")
    assert (response.status, response.output_text) == ("completed", WORDS)
    assert response.incomplete_details is None
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (11, 16, 27)
    assert (usage.input_tokens_details.cached_tokens, usage.output_tokens_details.reasoning_tokens) == (0, 0)


def test_response_stream_order_sequence_and_usage(oai, http):
    plain = oai.responses.create(model="m", input=PROMPT)
    events = list(oai.responses.create(model="m", input=PROMPT, stream=True))
    assert [event.type for event in events] == RESPONSE_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == WORDS
    assert events[-1].response.usage == plain.usage
    assert events[-1].response.output_text == WORDS
    assert [
        event["type"] for event in raw_events(http, "/v1/responses", {"model": "m", "input": PROMPT})
    ] == RESPONSE_EVENTS


def test_response_stream_helper_accumulates(oai):
    with oai.responses.stream(model="m", input=[{"role": "user", "content": PROMPT}]) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == WORDS
    assert final.usage.input_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_makes_an_incomplete_response(oai, stream):
    if stream:
        events = list(oai.responses.create(model="m", input=PROMPT, max_output_tokens=5, stream=True))
        assert events[-1].type == "response.incomplete"
        response = events[-1].response
    else:
        response = oai.responses.create(model="m", input=PROMPT, max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "word0 word1 word2 word3 word4"
    assert response.usage.output_tokens == 5


def test_reasoning_and_cache_tokens_plain_equal_streamed(oai, mock):
    asked = fault(reasoning_tokens=3, cached_tokens=4, cache_write_tokens=2)
    plain = oai.responses.create(model="m", input=PROMPT, max_output_tokens=9, extra_headers=asked)
    events = list(oai.responses.create(model="m", input=PROMPT, max_output_tokens=9, stream=True, extra_headers=asked))
    usage = plain.usage
    assert (
        usage.input_tokens,
        usage.input_tokens_details.cached_tokens,
        usage.input_tokens_details.cache_write_tokens,
    ) == (10, 4, 2)
    assert (usage.output_tokens, usage.output_tokens_details.reasoning_tokens) == (9, 3)  # 3 reasoning + 6 words
    assert [item.type for item in plain.output] == ["reasoning", "message"]
    assert plain.status == "incomplete"
    assert events[-1].response.usage == usage
    assert [event.type for event in events[2:4]] == ["response.output_item.added", "response.output_item.done"]
    assert events[2].item.type == "reasoning"
    assert mock.stats()["reasoning_tokens"] == 6
    assert mock.stats()["cache_write_tokens"] == 4


def test_stored_responses_retrieve_cancel_items_delete(oai):
    items = [{"role": "user", "content": "first"}, {"role": "user", "content": [{"type": "input_text", "text": "2"}]}]
    created = oai.responses.create(model="m", input=items)
    assert oai.responses.retrieve(created.id).output_text == WORDS
    assert oai.responses.cancel(created.id).id == created.id
    listed = oai.responses.input_items.list(created.id)
    assert [item.content[0].text for item in listed.data] == ["2", "first"]  # newest first, as the API lists
    ascending = oai.responses.input_items.list(created.id, order="asc")
    assert [item.content[0].text for item in ascending.data] == ["first", "2"]
    follow_up = oai.responses.create(model="m", input="next", previous_response_id=created.id)
    assert follow_up.previous_response_id == created.id
    oai.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as refused:
        oai.responses.create(model="m", input="again", previous_response_id=created.id)
    assert refused.value.body["param"] == "previous_response_id"


def test_a_stored_response_streams_again_from_any_sequence_number(oai, mock, http):
    created = list(oai.responses.create(model="m", input=PROMPT, stream=True))
    response_id = created[0].response.id
    again = list(oai.responses.retrieve(response_id, stream=True))
    assert [event.model_dump() for event in again] == [event.model_dump() for event in created]
    later = list(oai.responses.retrieve(response_id, stream=True, starting_after=5))
    assert [event.sequence_number for event in later] == list(range(6, len(RESPONSE_EVENTS)))
    assert later[-1].response.usage == created[-1].response.usage
    assert list(oai.responses.retrieve(response_id, stream=True, starting_after=len(RESPONSE_EVENTS))) == []
    assert mock.stats()["completion_tokens"] == 16  # a replay reports no new usage
    assert oai.responses.retrieve(response_id).output_text == WORDS  # without stream=true: the object
    refused = http.get(f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": "x"})
    assert refused.status_code == 400
    with pytest.raises(openai.NotFoundError):
        list(oai.responses.retrieve("resp_unknown", stream=True))


def test_a_replayed_stream_takes_the_stream_faults(oai):
    response_id = oai.responses.create(model="m", input=PROMPT).id
    replay = oai.responses.retrieve(
        response_id, stream=True, starting_after=3, extra_headers=fault(error_after_chunks=2)
    )
    assert [(event.type, event.sequence_number) for event in replay] == [
        ("response.output_text.delta", 4),
        ("response.output_text.delta", 5),
        ("error", 6),
    ]


def test_unstored_response_is_not_retrievable(oai):
    created = oai.responses.create(model="m", input=PROMPT, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(created.id)


def test_response_faults(oai, mock):
    mock.add_faults([{"status": 429, "retry_after": "1"}, {"no_usage": True}])
    with pytest.raises(openai.RateLimitError) as limited:
        oai.responses.create(model="m", input=PROMPT)
    assert limited.value.response.headers["retry-after"] == "1"
    assert oai.responses.create(model="m", input=PROMPT).usage is None
    assert mock.stats()["prompt_tokens"] == 0


@pytest.mark.parametrize("one_write", [False, True])
def test_response_stream_cut_raises_after_the_deltas_sent(oai, mock, one_write):
    received = []
    with pytest.raises(openai.APIConnectionError):
        for event in oai.responses.create(
            model="m", input=PROMPT, stream=True, extra_headers=fault(cut_after_chunks=3, cut_in_one_write=one_write)
        ):
            received.append(event.type)
    assert received == RESPONSE_EVENTS[: 4 + 3]
    assert (mock.stats()["completion_tokens"], mock.stats()["streams_completed"]) == (0, 0)


def test_response_stream_error_event(oai, mock):
    events = list(oai.responses.create(model="m", input=PROMPT, stream=True, extra_headers=fault(error_after_chunks=2)))
    assert [event.type for event in events] == [*RESPONSE_EVENTS[: 4 + 2], "error"]
    assert events[-1].sequence_number == 6
    assert events[-1].code == "server_error"
    assert mock.stats()["completion_tokens"] == 0


# --- the Anthropic Messages API --------------------------------------------------------------------


def test_message_plain(claude, mock):
    message = claude.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES, system="abcd")
    assert message.id.startswith("msg_")
    assert (message.content[0].text, message.stop_reason) == (WORDS, "end_turn")
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (11, 16)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)
    entry = mock.requests[-1]
    assert entry["query"] == ""
    # this SDK sends its api_key as a bearer token, and its own anthropic-version
    assert (entry["path"], entry["headers"]["authorization"]) == ("/v1/messages", "Bearer k")
    assert entry["headers"]["anthropic-version"] == anthropic._constants.ANTHROPIC_API_VERSION


def test_message_records_x_api_key_version_and_query(http, mock):
    body = {"model": "m", "max_tokens": 2, "messages": MESSAGES}
    assert http.post("/v1/messages?beta=true", json=body, headers=ANTHROPIC_HEADERS).status_code == 200
    assert mock.requests[-1]["query"] == "beta=true"  # as Claude Code sends it
    headers = mock.requests[-1]["headers"]
    assert (headers["x-api-key"], headers["anthropic-version"]) == ("k", "2023-06-01")


def test_message_max_tokens_stops_the_reply(claude):
    message = claude.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    assert (message.content[0].text, message.stop_reason) == ("word0 word1 word2 word3 word4", "max_tokens")
    assert message.usage.output_tokens == 5


def test_message_stream_usage_equals_plain(claude, http):
    asked = fault(cached_tokens=3, cache_write_tokens=2)
    plain = claude.messages.create(model="m", max_tokens=100, messages=MESSAGES, extra_headers=asked)
    assert (plain.usage.input_tokens, plain.usage.cache_read_input_tokens, plain.usage.cache_creation_input_tokens) == (
        5,
        3,
        2,
    )  # 10 prompt tokens, split the Anthropic way
    with claude.messages.stream(model="m", max_tokens=100, messages=MESSAGES, extra_headers=asked) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == WORDS
    assert final.usage == plain.usage
    events = raw_events(
        http, "/v1/messages", {"model": "m", "max_tokens": 100, "messages": MESSAGES}, ANTHROPIC_HEADERS
    )
    assert [event["type"] for event in events] == MESSAGE_EVENTS
    assert events[0]["message"]["usage"]["output_tokens"] == 1
    assert events[-2]["usage"]["output_tokens"] == 16  # cumulative, in message_delta


def test_message_raw_stream_events_parse(claude):
    events = list(claude.messages.create(model="m", max_tokens=3, messages=MESSAGES, stream=True))
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK drops ping
    assert events[-2].delta.stop_reason == "max_tokens"


def test_count_tokens(claude, mock):
    counted = claude.messages.count_tokens(model="m", messages=MESSAGES, system="abcd")
    assert counted.input_tokens == 11
    assert mock.requests[-1]["path"] == "/v1/messages/count_tokens"
    assert mock.stats()["prompt_tokens"] == 0


@pytest.mark.parametrize(
    ("status", "error_class", "kind"),
    [
        (529, anthropic.OverloadedError, "overloaded_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (500, anthropic.InternalServerError, "api_error"),
    ],
)
def test_message_errors_are_anthropic_shaped(claude, mock, status, error_class, kind):
    mock.add_faults([{"status": status, "retry_after": "0"}])
    with pytest.raises(error_class) as raised:
        claude.messages.create(model="m", max_tokens=10, messages=MESSAGES)
    assert raised.value.body["type"] == "error"
    assert raised.value.body["error"]["type"] == kind
    assert raised.value.request_id.startswith("req_")
    assert raised.value.response.headers["retry-after"] == "0"


def test_the_sdk_retries_an_overloaded_upstream(mock):
    mock.add_faults([{"status": 529, "retry_after": "0"}])
    with anthropic.Anthropic(base_url=mock.url.removesuffix("/v1"), api_key="k", max_retries=1) as sdk:
        assert sdk.messages.create(model="m", max_tokens=10, messages=MESSAGES).content[0].text
    assert len(mock.requests) == 2


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        (ANTHROPIC_HEADERS, {"model": "m", "messages": MESSAGES}, 400, "max_tokens: Field required"),
        (ANTHROPIC_HEADERS, {"max_tokens": 5, "messages": MESSAGES}, 400, "model: Field required"),
        (
            {"anthropic-version": "2023-06-01"},
            {"model": "m", "max_tokens": 5, "messages": MESSAGES},
            401,
            "x-api-key header is required",
        ),
        (
            {"x-api-key": "k"},
            {"model": "m", "max_tokens": 5, "messages": MESSAGES},
            400,
            "anthropic-version: header is required",
        ),
    ],
)
def test_message_refusals(http, headers, body, status, message):
    response = http.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["message"] == message
    assert response.json()["type"] == "error"
    assert response.headers["request-id"].startswith("req_")


def test_unknown_anthropic_path_is_anthropic_shaped(http):
    response = http.post("/v1/messages/nope", json={}, headers=ANTHROPIC_HEADERS)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_message_stream_cut_and_error_event(claude, mock):
    received = []
    with pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)):  # this SDK does not wrap it
        for event in claude.messages.create(
            model="m", max_tokens=100, messages=MESSAGES, stream=True, extra_headers=fault(cut_after_chunks=2)
        ):
            received.append(event.type)
    assert received == ["message_start", "content_block_start", "content_block_delta", "content_block_delta"]
    with pytest.raises(anthropic.APIStatusError) as raised:
        list(
            claude.messages.create(
                model="m", max_tokens=100, messages=MESSAGES, stream=True, extra_headers=fault(error_after_chunks=1)
            )
        )
    assert raised.value.body["error"]["type"] == "overloaded_error"
    assert mock.stats()["completion_tokens"] == 0


def test_message_stats_count_the_whole_prompt(claude, mock):
    claude.messages.create(model="m", max_tokens=4, messages=MESSAGES, extra_headers=fault(cached_tokens=6))
    stats = mock.stats()
    assert (stats["prompt_tokens"], stats["cached_tokens"], stats["completion_tokens"]) == (10, 6, 4)


@pytest.mark.parametrize("api", ["responses", "messages"])
@pytest.mark.parametrize(
    "asked",
    [{"cut_after_chunks": 1}, {"close_connection": True}],  # a plain reply cut halfway; no reply at all
)
def test_plain_replies_broken_by_faults(oai, claude, mock, api, asked):
    with pytest.raises((openai.APIConnectionError, anthropic.APIConnectionError, httpx2.TransportError)):
        if api == "responses":
            oai.responses.create(model="m", input=PROMPT, extra_headers=fault(**asked))
        else:
            claude.messages.create(model="m", max_tokens=10, messages=MESSAGES, extra_headers=fault(**asked))
    assert mock.stats()["prompt_tokens"] == 0


def test_bad_sse_line_and_malformed_json_on_the_new_routes(http, mock):
    events_with_bad_line = []
    body = {"model": "m", "input": PROMPT, "stream": True}
    with http.stream("POST", "/v1/responses", json=body, headers=fault(bad_sse_line=True, chunks=4)) as response:
        events_with_bad_line = [line for line in response.iter_lines() if line.startswith("data:")]
    assert "data: not-json" in events_with_bad_line
    mock.add_faults([{"malformed_json": True}])
    response = http.post(
        "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": MESSAGES}, headers=ANTHROPIC_HEADERS
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
