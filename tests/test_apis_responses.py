"""`proxy.apis.responses`: reading a POST /v1/responses, its usage, and the stream meter."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.responses import ResponseErrorEvent

from proxy.apis.responses import ResponsesCall, ResponsesStreamMeter, parse_responses_call, usage_from_response
from proxy.errors import InvalidRequest
from proxy.limits.types import Usage
from proxy.mocks.responses import ResponseCall
from proxy.upstream.sse import EventSplitter

DEFAULT = 64
IMAGE = {"type": "input_image", "image_url": "https://example.com/a.png"}


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
        ({"input": "abcdefgh"}, ResponsesCall("m", False, None, 2, DEFAULT)),
        ({"input": "abcdefgh", "instructions": "abcd"}, ResponsesCall("m", False, None, 3, DEFAULT)),
        # each item: its 4-token message overhead plus every text part
        ({"input": [{"role": "user", "content": "abcd"}]}, ResponsesCall("m", False, None, 5, DEFAULT)),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcdefgh"}, IMAGE]}]},
            ResponsesCall("m", False, None, 4 + 2 + 85, DEFAULT),
        ),
        (
            {
                "input": [
                    {"type": "function_call", "call_id": "c", "name": "abcd", "arguments": '{"a":1}'},
                    {"type": "function_call_output", "call_id": "c", "output": "abcdefgh"},
                ]
            },
            ResponsesCall("m", False, None, (4 + 1 + 2) + (4 + 2), DEFAULT),
        ),
        (
            {"input": [{"type": "reasoning", "id": "rs", "summary": [{"type": "summary_text", "text": "abcd"}]}]},
            ResponsesCall("m", False, None, 5, DEFAULT),
        ),
        # tool definitions count as their JSON text: '[{"type":"function","name":"f"}]' is 32 characters
        ({"input": "", "tools": [{"type": "function", "name": "f"}]}, ResponsesCall("m", False, None, 8, DEFAULT)),
        ({"input": "abcd", "max_output_tokens": 100}, ResponsesCall("m", False, None, 1, 100)),
        ({"input": "abcd", "stream": True, "background": False}, ResponsesCall("m", True, None, 1, DEFAULT)),
        ({"input": "abcd", "stream": None, "instructions": None}, ResponsesCall("m", False, None, 1, DEFAULT)),
        ({"previous_response_id": "resp_1"}, ResponsesCall("m", False, "resp_1", 0, DEFAULT)),
        ({"previous_response_id": "resp_1", "input": "abcd"}, ResponsesCall("m", False, "resp_1", 1, DEFAULT)),
    ],
)
def test_reads_the_call(fields, expected):
    assert parse_responses_call({"model": "m", **fields}, DEFAULT) == expected


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        ({"input": "x"}, "model", "missing_required_parameter", "Missing required parameter: 'model'."),
        (
            {"model": 5, "input": "x"},
            "model",
            "invalid_type",
            "Invalid type for 'model': expected a string, but got a number instead.",
        ),
        ({"model": "m"}, "input", "missing_required_parameter", "Missing required parameter: 'input'."),
        (
            {"model": "m", "input": {"a": 1}},
            "input",
            "invalid_type",
            "Invalid type for 'input': expected one of a string or array of input items, but got an object instead.",
        ),
        (
            {"model": "m", "input": ["x"]},
            "input[0]",
            "invalid_type",
            "Invalid type for 'input[0]': expected an object, but got a string instead.",
        ),
        ({"model": "m", "input": "x", "instructions": 3}, "instructions", "invalid_type", None),
        ({"model": "m", "input": "x", "tools": {}}, "tools", "invalid_type", None),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream", "invalid_type", None),
        ({"model": "m", "input": "x", "background": "yes"}, "background", "invalid_type", None),
        ({"model": "m", "input": "x", "background": True}, "background", "unsupported_parameter", None),
        (
            {"model": "m", "input": "x", "max_output_tokens": 0},
            "max_output_tokens",
            "integer_below_min_value",
            "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ),
        (
            {"model": "m", "input": "x", "max_output_tokens": 2**31},
            "max_output_tokens",
            "integer_above_max_value",
            None,
        ),
        ({"model": "m", "input": "x", "max_output_tokens": "5"}, "max_output_tokens", "invalid_type", None),
        ({"model": "m", "input": "x", "max_output_tokens": True}, "max_output_tokens", "invalid_type", None),
        ({"model": "m", "previous_response_id": 5}, "previous_response_id", "invalid_type", None),
    ],
)
def test_refusals_name_the_param(body, param, code, message):
    with pytest.raises(InvalidRequest) as refused:
        parse_responses_call(body, DEFAULT)
    error = refused.value
    assert (error.status, error.type, error.param, error.code) == (400, "invalid_request_error", param, code)
    if message is not None:
        assert error.message == message


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            {
                "usage": {
                    "input_tokens": 10,
                    "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2},
                    "output_tokens": 9,
                    "output_tokens_details": {"reasoning_tokens": 3},
                    "total_tokens": 19,
                }
            },
            usage_of(10, 4, 2, 9, 3),
        ),
        ({"usage": {"input_tokens": 10, "output_tokens": 9}}, usage_of(10, 0, 0, 9, 0)),
        (
            {
                "usage": {
                    "input_tokens": 5,
                    "input_tokens_details": {"cached_tokens": 9},
                    "output_tokens": 1,
                    "output_tokens_details": {"reasoning_tokens": 4},
                }
            },
            usage_of(5, 5, 0, 1, 1),
        ),  # clamped
        ({"usage": {"input_tokens": "10", "input_tokens_details": None, "output_tokens": -1}}, usage_of()),
        ({"usage": None}, None),
        ({}, None),
        ("not an object", None),
    ],
)
def test_usage_from_response(response, expected):
    assert usage_from_response(response) == expected


def mock_stream(fault: dict, **fields) -> tuple[ResponseCall, bytes]:
    call = ResponseCall({"model": "m", "input": "x" * 40, **fields}, fault, chunks=16, ident=1)
    script = call.script()
    return call, b"".join(script.head + script.deltas + script.tail)


def meter_of(stream: bytes, piece: int = 7, prompt_tokens: int = 99) -> tuple[ResponsesStreamMeter, bytes]:
    """Feed `stream` in `piece`-byte network chunks through the splitter, as the relay would."""
    meter = ResponsesStreamMeter(prompt_tokens)
    splitter = EventSplitter()
    relayed = []
    for start in range(0, len(stream), piece):
        block = splitter.feed_block(stream[start : start + piece])
        if block:
            meter.feed(block)
            relayed.append(block)
    assert b"".join(relayed) == stream  # every byte came out as part of a whole event
    return meter, b"".join(relayed)


@pytest.mark.parametrize(
    ("fault", "fields"),
    [
        ({}, {}),
        ({"reasoning_tokens": 3, "cached_tokens": 4, "cache_write_tokens": 2}, {}),
        ({}, {"max_output_tokens": 5}),  # ends with response.incomplete
        ({"reasoning_tokens": 7}, {"max_output_tokens": 5}),  # reasoning used the whole cap: no message
    ],
)
def test_stream_meter_reads_the_final_event(fault, fields):
    call, stream = mock_stream(fault, **fields)
    meter, relayed = meter_of(stream)
    assert relayed == stream  # events, `event:` lines included, pass through unchanged
    assert meter.finished
    assert meter.usage() == usage_from_response(call.response())


@pytest.mark.parametrize("sent", [0, 1, 3, 16])
def test_stream_cut_before_the_final_event_is_charged_what_was_produced(sent):
    call = ResponseCall({"model": "m", "input": "x"}, {}, chunks=16, ident=1)
    script = call.script()
    meter, _ = meter_of(b"".join(script.head + script.deltas[:sent]), prompt_tokens=12)
    produced = len("".join(f"word{i}" if i == 0 else f" word{i}" for i in range(sent)))
    assert not meter.finished
    assert meter.usage() == usage_of(input_tokens=12, output_tokens=-(-produced // 4))


def test_failed_response_without_usage_is_estimated():
    failed = {
        "type": "response.failed",
        "sequence_number": 3,
        "response": {"id": "r", "status": "failed", "usage": None},
    }
    delta = {"type": "response.output_text.delta", "sequence_number": 2, "delta": "abcdefgh"}
    meter = ResponsesStreamMeter(5)
    for payload in (delta, failed):
        meter.feed(b"event: " + payload["type"].encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")
    assert meter.usage() == usage_of(input_tokens=5, output_tokens=2)


def test_events_without_event_lines_are_read_by_type():
    call, stream = mock_stream({"cached_tokens": 2})
    bare = re.sub(rb"event: [^\n]*\n", b"", stream)
    meter, _ = meter_of(bare)
    assert meter.usage() == usage_from_response(call.response())


def test_error_event_follows_the_last_sequence_number():
    call = ResponseCall({"model": "m", "input": "x"}, {}, chunks=16, ident=1)
    script = call.script()
    meter, _ = meter_of(b"".join(script.head + script.deltas[:2]))
    event = meter.error_event("The upstream stream was interrupted before it finished.")
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    parsed = ResponseErrorEvent.model_validate(orjson.loads(event.split(b"data: ", 1)[1]))
    assert (parsed.sequence_number, parsed.code) == (len(script.head) + 2, "upstream_error")


def sse_event(payload: dict, named: bool = True) -> bytes:
    name = b"event: " + payload["type"].encode() + b"\n" if named else b""
    return name + b"data: " + orjson.dumps(payload) + b"\n\n"


def tricky_stream(named: bool) -> list[bytes]:
    """Deltas whose text names the markers the meter looks for, a delta-less event with text, and
    metadata keyed `delta` in the response object: only the deltas of delta events count."""
    response = {"id": "resp_1", "status": "in_progress", "metadata": {"delta": "not produced"}, "usage": None}
    texts = ['"response": {"usage"', "response.completed", "event: error\n\n", "\u00e9t\u00e9 \\ fin"]
    payloads = [
        {"type": "response.created", "sequence_number": 0, "response": response},
        {"type": "response.output_text.delta", "sequence_number": 1, "delta": texts[0]},
        {"type": "response.output_text.done", "sequence_number": 2, "text": "abc"},
        {"type": "response.output_text.delta", "sequence_number": 3, "delta": texts[1]},
        {"type": "response.function_call_arguments.delta", "sequence_number": 4, "delta": texts[2]},
        {"type": "response.output_text.delta", "sequence_number": 5, "delta": texts[3]},
        {
            "type": "response.completed",
            "sequence_number": 6,
            "response": response | {"status": "completed", "usage": {"input_tokens": 3, "output_tokens": 9}},
        },
    ]
    return [sse_event(payload, named) for payload in payloads]


def mock_events(fault: dict, **fields) -> list[bytes]:
    script = ResponseCall({"model": "m", "input": "x" * 40, **fields}, fault, chunks=6, ident=1).script()
    return script.head + script.deltas + script.tail


STREAMS = [
    mock_events({}),
    mock_events({"reasoning_tokens": 3, "cached_tokens": 4}, max_output_tokens=5),
    [re.sub(rb"event: [^\n]*\n", b"", event) for event in mock_events({})],
    tricky_stream(named=True),
    tricky_stream(named=False),
]


def one_by_one(events: list[bytes]) -> ResponsesStreamMeter:
    """The reference: each event read alone, on the meter's own per-event path."""
    meter = ResponsesStreamMeter(7)
    for event in events:
        meter._feed_event(event)
        meter._last = event
    return meter


def assert_metered_alike(blocks: ResponsesStreamMeter, events: list[bytes]) -> None:
    reference = one_by_one(events)
    assert (blocks.usage(), blocks.finished) == (reference.usage(), reference.finished)
    assert blocks.error_event("cut") == reference.error_event("cut")


@pytest.mark.parametrize("stream", range(len(STREAMS)))
@pytest.mark.parametrize("group", [1, 2, 3, 100])
def test_blocks_of_whole_events_are_metered_as_their_events_one_by_one(stream: int, group: int) -> None:
    """A block is read as its events one at a time (the same usage, the same error event after
    them), the stream cut after any event."""
    for cut in range(len(STREAMS[stream]) + 1):
        events, blocks = STREAMS[stream][:cut], ResponsesStreamMeter(7)
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
    data, blocks = b"".join(events), ResponsesStreamMeter(7)
    splitter, position, index = EventSplitter(), 0, 0
    while position < len(data):
        size = pieces[index % len(pieces)]
        block = splitter.feed_block(data[position : position + size])
        if block:
            blocks.feed(block)
        position, index = position + size, index + 1
    assert_metered_alike(blocks, events)


def test_only_the_deltas_of_delta_events_are_produced_text():
    for named in (True, False):
        meter, _ = meter_of(b"".join(tricky_stream(named)[:6]), piece=1000, prompt_tokens=4)
        escaped = [b'\\"response\\": {\\"usage\\"', b"response.completed", b"event: error\\n\\n"]
        chars = sum(map(len, escaped)) + len(orjson.dumps("\u00e9t\u00e9 \\ fin")) - 2
        assert meter.usage() == usage_of(input_tokens=4, output_tokens=-(-chars // 4))


@given(st.text())
def test_a_deltas_characters_are_those_of_its_json_string(text: str) -> None:
    """Quotes, backslashes and escapes inside the delta never end it early or late."""
    payload = {"type": "response.output_text.delta", "sequence_number": 1, "delta": text, "logprobs": []}
    for spaced in (False, True):
        data = json.dumps(payload).encode() if spaced else orjson.dumps(payload)
        meter = ResponsesStreamMeter(0)
        meter.feed(b"event: response.output_text.delta\ndata: " + data + b"\n\n")
        escaped = json.dumps(text) if spaced else orjson.dumps(text).decode()
        assert meter.usage().completion_tokens == -(-(len(escaped.encode()) - 2) // 4)
