"""`sse.ChatStreamMeter`: a block of chat completion events is relayed and metered exactly as its
events one by one (the per-event path parses the usage chunk; blocks without one take the fast
path), however the network groups them and wherever the stream is cut."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.limits.types import Usage
from proxy.upstream.sse import ChatStreamMeter, EventSplitter

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 2}}


def chunk(payload: dict, spaced: bool = False) -> bytes:
    data = json.dumps(payload).encode() if spaced else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def chat_stream(*, spaced: bool = False, usage_chunk: bool = True, texts: tuple[str, ...] = ("a", " b")) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
    null = {"usage": None} if usage_chunk else {}
    events = [chunk(base | {"choices": [{"index": 0, "delta": {"role": "assistant"}}]} | null, spaced)]
    events += [chunk(base | {"choices": [{"index": 0, "delta": {"content": text}}]} | null, spaced) for text in texts]
    events.append(chunk(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]} | null, spaced))
    if usage_chunk:
        events.append(chunk(base | {"choices": [], "usage": USAGE}, spaced))
    return [*events, b"data: [DONE]\n\n"]


STREAMS = [
    chat_stream(),
    chat_stream(spaced=True),
    chat_stream(usage_chunk=False),
    chat_stream(texts=('says "usage": {"prompt_tokens": 1} and [DONE]', "\u00e9\\")),
    [*chat_stream()[:2], b"data: not-json\n\n", *chat_stream()[2:]],
    [  # usage beside the last choice, as some compatible servers send it
        chunk({"choices": [{"index": 0, "delta": {"content": "abc"}}]}),
        chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE}),
        b"data: [DONE]\n\n",
    ],
    [chunk({"choices": [{"index": 0, "text": "legacy completion"}], "usage": None}), b"data: [DONE]\n\n"],
]


def one_by_one(events: list[bytes], keep_usage: bool) -> tuple[bytes, Usage, bool]:
    """The reference: each event read alone, on the meter's own per-event path."""
    meter = ChatStreamMeter(5, keep_usage)
    relayed = b"".join([meter._feed_event(event) for event in events])
    return relayed, meter.usage(), meter.done


@pytest.mark.parametrize("keep_usage", [True, False])
@pytest.mark.parametrize("stream", range(len(STREAMS)))
@pytest.mark.parametrize("group", [1, 2, 3, 100])
def test_blocks_of_whole_events_are_relayed_and_metered_as_their_events(keep_usage, stream, group):
    for cut in range(len(STREAMS[stream]) + 1):
        events, meter = STREAMS[stream][:cut], ChatStreamMeter(5, keep_usage)
        relayed = b"".join(meter.feed(b"".join(events[start : start + group])) for start in range(0, cut, group))
        assert (relayed, meter.usage(), meter.done) == one_by_one(events, keep_usage)


@given(
    st.booleans(),
    st.sampled_from(range(len(STREAMS))),
    st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20),
)
def test_any_network_chunking_is_relayed_and_metered_as_the_events(keep_usage, stream, pieces):
    data, meter, splitter = b"".join(STREAMS[stream]), ChatStreamMeter(5, keep_usage), EventSplitter()
    relayed, position, index = [], 0, 0
    while position < len(data):
        size = pieces[index % len(pieces)]
        block = splitter.feed_block(data[position : position + size])
        relayed.append(meter.feed(block) if block else b"")
        position, index = position + size, index + 1
    assert (b"".join(relayed), meter.usage(), meter.done) == one_by_one(STREAMS[stream], keep_usage)


def test_the_usage_chunk_is_dropped_unless_asked_and_null_usage_removed():
    meter = ChatStreamMeter(5, keep_usage=False)
    relayed = meter.feed(b"".join(chat_stream()))
    assert b"usage" not in relayed and relayed.endswith(b"data: [DONE]\n\n")
    assert meter.usage() == Usage(9, 4, 2) and meter.done
    kept = ChatStreamMeter(5, keep_usage=True)
    assert kept.feed(b"".join(chat_stream())) == b"".join(chat_stream())


def test_a_stream_without_usage_is_charged_its_text():
    meter = ChatStreamMeter(5, keep_usage=False)
    meter.feed(b"".join(chat_stream(usage_chunk=False, texts=("abcd", "efgh", "i"))))
    assert meter.usage() == Usage(5, 3, 0)  # 9 characters / 4, rounded up


@given(st.text(), st.sampled_from(["content", "reasoning_content", "text"]), st.booleans())
def test_texts_characters_are_those_of_its_json_string(text: str, key: str, spaced: bool) -> None:
    meter = ChatStreamMeter(0, keep_usage=False)
    meter.feed(chunk({"choices": [{"index": 0, "delta": {key: text}}], "usage": None}, spaced))
    escaped = json.dumps(text).encode() if spaced else orjson.dumps(text)
    assert meter.usage().completion_tokens == -(-(len(escaped) - 2) // 4)
