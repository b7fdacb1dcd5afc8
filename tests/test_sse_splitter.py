"""EventSplitter: whole events, each with its blank line, however the network chunks the bytes;
the fast path (no CR anywhere) agrees with the general one."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from proxy.upstream.sse import EventSplitter, events_in, split_marked

END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def reference(stream: bytes) -> tuple[list[bytes], bytes]:
    events, start = [], 0
    for match in END.finditer(stream):
        events.append(stream[start : match.end()])
        start = match.end()
    return events, stream[start:]


@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\n\n", b"event: e", b"\r\n\r\n", b"{}"]), max_size=30),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=30),
)
def test_any_chunking_gives_the_reference_events(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    splitter = EventSplitter()
    events: list[bytes] = []
    position, index = 0, 0
    while position < len(stream):
        size = cuts[index % len(cuts)]
        events += splitter.feed(stream[position : position + size])
        position, index = position + size, index + 1
    expected, rest = reference(stream)
    assert events == expected
    assert b"".join(events) + splitter._buffer == stream
    assert splitter._buffer == rest


@given(
    st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\n\n", b"event: e", b"\r\n\r\n", b"{}"]), max_size=30),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=30),
)
def test_blocks_end_where_the_events_end(parts: list[bytes], cuts: list[int]) -> None:
    """`feed_block` gives, per chunk, exactly the bytes of the events `feed` would give for it."""
    stream = b"".join(parts)
    by_event, by_block = EventSplitter(), EventSplitter()
    position, index = 0, 0
    while position < len(stream):
        chunk = stream[position : position + cuts[index % len(cuts)]]
        events, block = by_event.feed(chunk), by_block.feed_block(chunk)
        assert block == b"".join(events)
        assert events_in(block) == events
        assert by_block._buffer == by_event._buffer
        position, index = position + len(chunk), index + 1


MARKERS = (b'"usage":{', b"[DONE]")


@given(
    st.lists(
        st.sampled_from(
            [
                b"data: a\n\n",
                b'event: x\ndata: {"usage":{}}\n\n',
                b"data: [DONE]\n\n",
                b'data: b "usage":{ and [DONE]\n\n',
                b"data: {}\r\n\r\n",
                b"\n\n",
                b"data: c\r\r",
            ]
        ),
        max_size=20,
    )
)
def test_split_marked_sets_apart_exactly_the_events_with_a_marker(events: list[bytes]) -> None:
    block = b"".join(events)
    pieces = split_marked(block, MARKERS)
    assert b"".join(piece for piece, _ in pieces) == block
    for piece, one in pieces:
        assert one == any(marker in piece for marker in MARKERS)
        if one:
            assert len(events_in(piece)) == 1
    assert sum(one for _, one in pieces) == sum(any(m in event for m in MARKERS) for event in events_in(block))
