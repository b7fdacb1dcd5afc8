"""`proxy.apis.anthropic`: reading a POST /v1/messages, its usage, and the stream meter."""

from __future__ import annotations

import re

import orjson
import pytest
from anthropic.types.shared import ErrorResponse
from hypothesis import given
from hypothesis import strategies as st

from proxy.apis.anthropic import MessagesCall, MessagesStreamMeter, error_event, parse_messages_call, usage_from_message
from proxy.errors import InvalidRequest
from proxy.limits.types import Usage
from proxy.mocks.anthropic import MessageCall
from proxy.upstream.sse import EventSplitter

USER = {"role": "user", "content": "abcd"}  # 4 overhead + 1 text
PRIMING = 3
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}


def usage_of(
    input_tokens: int = 0,
    cached_input_tokens: int = 0,
    cache_write_tokens: int = 0,
    output_tokens: int = 0,
    reasoning_tokens: int = 0,
) -> Usage:
    """The project's Usage from the agent APIs' own names for its parts."""
    return Usage(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, MessagesCall("m", False, 5 + PRIMING, 100)),
        ({"system": "abcdefgh"}, MessagesCall("m", False, 5 + PRIMING + 2, 100)),
        ({"system": [{"type": "text", "text": "abcdefgh"}]}, MessagesCall("m", False, 5 + PRIMING + 4 + 2, 100)),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}, IMAGE]}]},
            MessagesCall("m", False, 4 + 2 + 85 + PRIMING, 100),
        ),
        # a tool call's name and JSON input, a tool result's content
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "abcd", "input": {"a": 1}}],
                    },
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "abcdefgh"}]},
                ]
            },
            MessagesCall("m", False, 5 + (4 + 1 + 2) + (4 + 2) + PRIMING, 100),
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "thinking", "thinking": "abcd", "signature": "s"}]}
                ]
            },
            MessagesCall("m", False, 4 + 1 + PRIMING, 100),
        ),
        # tool definitions count as their JSON text: '[{"name":"f"}]' is 14 characters
        ({"tools": [{"name": "f"}]}, MessagesCall("m", False, 5 + PRIMING + 4, 100)),
        ({"stream": True, "max_tokens": 7}, MessagesCall("m", True, 5 + PRIMING, 7)),
    ],
)
def test_reads_the_call(fields, expected):
    body = {"model": "m", "max_tokens": 100, "messages": [USER]} | fields
    assert parse_messages_call(body) == expected


def test_count_tokens_needs_no_max_tokens_and_reserves_nothing():
    assert parse_messages_call({"model": "m", "messages": [USER], "stream": True}, count_tokens=True) == MessagesCall(
        "m", False, 5 + PRIMING, 0
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": True}, "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"model": None}, "model: Field required"),
        ({"model": 3}, "model: Input should be a valid string"),
        ({"messages": None}, "messages: Field required"),
        ({"messages": "hi"}, "messages: Input should be a valid list"),
        ({"messages": ["hi"]}, "messages.0: Input should be a valid dictionary"),
        ({"messages": [USER, {"content": "x"}]}, "messages.1.role: Field required"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role: Input should be 'user' or 'assistant'"),
        ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
        (
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content: Input should be a valid string or a list of content blocks",
        ),
        ({"system": 5}, "system: Input should be a valid string or a list of text blocks"),
        ({"tools": {}}, "tools: Input should be a valid list"),
        ({"stream": "yes"}, "stream: Input should be a valid boolean"),
    ],
)
def test_refusals_are_worded_as_anthropic_words_them(fields, message):
    body = {"model": "m", "max_tokens": 100, "messages": [USER]} | fields
    body = {key: value for key, value in body.items() if value is not None}
    with pytest.raises(InvalidRequest) as refused:
        parse_messages_call(body)
    assert (refused.value.status, refused.value.message) == (400, message)
    assert refused.value.param == message.split(":")[0]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {
                "usage": {
                    "input_tokens": 5,
                    "cache_creation_input_tokens": 2,
                    "cache_read_input_tokens": 3,
                    "output_tokens": 16,
                }
            },
            usage_of(10, 3, 2, 16, 0),
        ),
        ({"usage": {"input_tokens": 5, "output_tokens": 1}}, usage_of(5, 0, 0, 1, 0)),
        (
            {"usage": {"input_tokens": 5, "cache_creation_input_tokens": None, "output_tokens": "7"}},
            usage_of(5, 0, 0, 0, 0),
        ),
        ({"usage": None}, None),
        ({}, None),
        ([], None),
    ],
)
def test_usage_from_message(message, expected):
    assert usage_from_message(message) == expected


def mock_call(fault: dict, max_tokens: int = 100) -> MessageCall:
    return MessageCall(
        {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "x" * 40}]},
        fault,
        chunks=16,
        ident=1,
    )


def meter_of(stream: bytes, piece: int = 5, prompt_tokens: int = 99) -> tuple[MessagesStreamMeter, bytes]:
    meter = MessagesStreamMeter(prompt_tokens)
    splitter = EventSplitter()
    relayed = []
    for start in range(0, len(stream), piece):
        block = splitter.feed_block(stream[start : start + piece])
        if block:
            meter.feed(block)
            relayed.append(block)
    return meter, b"".join(relayed)


@pytest.mark.parametrize(
    ("fault", "max_tokens"),
    [({}, 100), ({"cached_tokens": 3, "cache_write_tokens": 2}, 100), ({}, 4), ({"usage_multiplier": 2}, 100)],
)
def test_stream_meter_reads_message_start_and_the_cumulative_delta(fault, max_tokens):
    call = mock_call(fault, max_tokens)
    script = call.script()
    stream = b"".join(script.head + script.deltas + script.tail)
    meter, relayed = meter_of(stream)
    assert relayed == stream  # ping and every `event:` line pass through unchanged
    assert meter.finished
    assert meter.usage() == usage_from_message(call.message())


def test_a_later_message_delta_replaces_the_input_split():
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {
            "input_tokens": 4,
            "cache_read_input_tokens": 6,
            "cache_creation_input_tokens": None,
            "output_tokens": 20,
        },
    }
    meter = MessagesStreamMeter(99)
    for payload in (start, delta):
        meter.feed(f"event: {payload['type']}\n".encode() + b"data: " + orjson.dumps(payload) + b"\n\n")
    assert meter.usage() == usage_of(10, 6, 0, 20, 0)


@pytest.mark.parametrize("sent", [0, 1, 5, 16])
def test_cut_after_message_start_keeps_its_input_and_estimates_output(sent):
    call = mock_call({"cached_tokens": 4})
    script = call.script()
    meter, _ = meter_of(b"".join(script.head + script.deltas[:sent]))
    produced = len("".join(f"word{i}" if i == 0 else f" word{i}" for i in range(sent)))
    assert not meter.finished
    assert meter.usage() == usage_of(10, 4, 0, max(1, -(-produced // 4)), 0)


def test_cut_before_message_start_uses_the_estimate():
    meter = MessagesStreamMeter(12)
    meter.feed(b'event: ping\ndata: {"type": "ping"}\n\n')
    assert meter.usage() == usage_of(input_tokens=12)


def test_events_without_event_lines_are_read_by_type():
    call = mock_call({"cache_write_tokens": 3})
    script = call.script()
    bare = re.sub(rb"event: [^\n]*\n", b"", b"".join(script.head + script.deltas[:3]))
    meter, _ = meter_of(bare)
    assert meter.usage() == usage_of(10, 0, 3, 5, 0)  # "word0 word1 word2" is 17 characters


def test_error_event_parses_as_the_sdk_reads_it():
    event = error_event("api_error", "The upstream stream was interrupted before it finished.")
    name, data = event.removesuffix(b"\n\n").split(b"\n")
    assert name == b"event: error"
    parsed = ErrorResponse.model_validate(orjson.loads(data.removeprefix(b"data: ")))
    assert (parsed.type, parsed.error.type) == ("error", "api_error")
    assert parsed.error.message == "The upstream stream was interrupted before it finished."


def sse_event(payload: dict, named: bool = True) -> bytes:
    name = b"event: " + payload["type"].encode() + b"\n" if named else b""
    return name + b"data: " + orjson.dumps(payload) + b"\n\n"


def tricky_stream(named: bool) -> list[bytes]:
    """Text naming the events the meter reads one by one, a content block that opens with text (not
    produced here), thinking and a tool's partial JSON: only content_block_delta's text counts."""
    usage = {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 1}
    delta = {"type": "content_block_delta", "index": 0}
    payloads = [
        {"type": "message_start", "message": {"id": "msg_1", "content": [], "usage": usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "not produced"}},
        {"type": "ping"},
        delta | {"delta": {"type": "text_delta", "text": '"message_delta" and "usage": {'}},
        delta | {"delta": {"type": "thinking_delta", "thinking": '"content_block_start"'}},
        delta | {"delta": {"type": "input_json_delta", "partial_json": '{"a": "\u00e9"}'}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 30}},
        {"type": "message_stop"},
    ]
    return [sse_event(payload, named) for payload in payloads]


def mock_events(fault: dict) -> list[bytes]:
    script = mock_call(fault).script()
    return script.head + script.deltas[:6] + script.tail


STREAMS = [
    mock_events({}),
    mock_events({"cached_tokens": 3, "cache_write_tokens": 2}),
    [re.sub(rb"event: [^\n]*\n", b"", event) for event in mock_events({})],
    tricky_stream(named=True),
    tricky_stream(named=False),
]


def one_by_one(events: list[bytes]) -> MessagesStreamMeter:
    """The reference: each event read alone, on the meter's own per-event path."""
    meter = MessagesStreamMeter(7)
    for event in events:
        meter._feed_event(event)
    return meter


def assert_metered_alike(blocks: MessagesStreamMeter, events: list[bytes]) -> None:
    reference = one_by_one(events)
    assert (blocks.usage(), blocks.finished) == (reference.usage(), reference.finished)


@pytest.mark.parametrize("stream", range(len(STREAMS)))
@pytest.mark.parametrize("group", [1, 2, 3, 100])
def test_blocks_of_whole_events_are_metered_as_their_events_one_by_one(stream: int, group: int) -> None:
    """A block is read as its events one at a time, the stream cut after any event."""
    for cut in range(len(STREAMS[stream]) + 1):
        events, blocks = STREAMS[stream][:cut], MessagesStreamMeter(7)
        for start in range(0, cut, group):
            blocks.feed(b"".join(events[start : start + group]))
        assert_metered_alike(blocks, events)


@given(
    st.sampled_from(range(len(STREAMS))),
    st.integers(min_value=0, max_value=20),
    st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20),
)
def test_any_network_chunking_is_metered_as_the_events_one_by_one(stream: int, cut: int, pieces: list[int]) -> None:
    events = STREAMS[stream][:cut]
    data, blocks = b"".join(events), MessagesStreamMeter(7)
    splitter, position, index = EventSplitter(), 0, 0
    while position < len(data):
        size = pieces[index % len(pieces)]
        block = splitter.feed_block(data[position : position + size])
        if block:
            blocks.feed(block)
        position, index = position + size, index + 1
    assert_metered_alike(blocks, events)


def test_only_content_block_deltas_are_produced_text():
    for named in (True, False):
        meter, _ = meter_of(b"".join(tricky_stream(named)[:6]), piece=1000, prompt_tokens=4)
        texts = [b'\\"message_delta\\" and \\"usage\\": {', b'\\"content_block_start\\"']
        chars = sum(map(len, texts)) + len(orjson.dumps('{"a": "\u00e9"}')) - 2
        assert meter.usage() == usage_of(7, 2, 0, -(-chars // 4), 0)
