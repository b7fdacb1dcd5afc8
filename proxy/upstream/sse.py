"""Server-sent events as bytes: split on blank lines, parse only the events usage lives in."""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..limits.types import Usage

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# generated text's JSON string, its loop unrolled (no branch per character: ~8x faster on long text)
_TEXT = re.compile(rb'"(?:content|text|reasoning_content)": ?"([^"\\]*(?:\\.[^"\\]*)*)"')
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_NULL_USAGE = (b',"usage":null', b', "usage": null')
_DONE = b"[DONE]"


class EventSplitter:
    """Feeds network chunks, gives back the complete events (each ending with its blank line):
    one by one (`feed`), or as one block of bytes, all the events a chunk completed (`feed_block`,
    the relay's: no object per event). The bytes of an event never straddle two answers."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" not in buffer:  # the usual case, without the regex: ~5x cheaper per event
            *complete, self._buffer = buffer.split(b"\n\n")
            return [event + b"\n\n" for event in complete]
        events = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            events.append(buffer[start : match.end()])
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def feed_block(self, chunk: bytes) -> bytes:
        """The complete events the chunk finished, as one block (b"" when it finished none)."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" not in buffer:
            end = buffer.rfind(b"\n\n")
            if end < 0:
                self._buffer = buffer
                return b""
            if end == 0 or buffer[end - 1] == 10:  # in a run of newlines: end where `feed` splits
                end = len(buffer) - len(buffer.split(b"\n\n")[-1])
            else:
                end += 2
        else:
            end = 0
            for match in _EVENT_END.finditer(buffer):
                end = match.end()
        self._buffer = buffer[end:]
        return buffer if end == len(buffer) else buffer[:end]


def events_in(block: bytes) -> list[bytes]:
    """The events of a block of complete events (as `EventSplitter.feed_block` gives them)."""
    return EventSplitter().feed(block)


def event_data(event: bytes) -> bytes:
    """The joined `data:` field of one event (without the prefix)."""
    lines = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in event.splitlines()]
    return b"\n".join(line for line in lines if line is not None)


def text_length(event: bytes) -> int:
    """Characters of generated text in one chunk (as JSON-escaped bytes: close enough to estimate)."""
    return sum(len(match.group(1)) for match in _TEXT.finditer(event))


def carries_usage(event: bytes) -> bool:
    return any(marker in event for marker in _USAGE_MARKERS)


def strip_null_usage(events: bytes) -> bytes:
    """Remove the `"usage": null` an upstream adds to each chunk once include_usage is on."""
    for marker in _NULL_USAGE:
        if marker in events:
            events = events.replace(marker, b"")
    return events


def parse_event(event: bytes) -> dict[str, Any] | None:
    try:
        value: object = orjson.loads(event_data(event))
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def usage_from(payload: dict[str, Any]) -> Usage | None:
    """`usage` of an OpenAI response or chunk, or None when absent or malformed."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if completion == 0 and "completion_tokens" not in usage:
        completion = max(0, _count(usage.get("total_tokens")) - prompt)
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    if cached == 0:  # DeepSeek reports cache hits at the top level
        cached = _count(usage.get("prompt_cache_hit_tokens"))
    written = _count(details.get("cache_write_tokens")) if isinstance(details, dict) else 0
    output = usage.get("completion_tokens_details")
    reasoning = _count(output.get("reasoning_tokens")) if isinstance(output, dict) else 0
    cached = min(cached, prompt)
    return Usage(prompt, completion, cached, min(written, prompt - cached), min(reasoning, completion))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def is_done(event: bytes) -> bool:
    return event_data(event).strip() == b"[DONE]"


def error_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChatStreamMeter:
    """Fed the blocks of a chat completions stream (one or more complete events each), it gives
    back what to relay of each, and the usage at the end: the upstream's, or, for a stream cut
    short or an upstream that reports none, `prompt_tokens` and the relayed text's characters / 4.

    The proxy always asks for usage: unless the client asked too (`keep_usage`), the usage-only
    chunk is dropped and the `"usage": null` of the others removed. Only a block with a usage
    object or `[DONE]` in it is read event by event (the usage chunk is parsed); any other is
    relayed and counted in one pass, with no object per event.
    """

    __slots__ = ("_keep_usage", "_prompt_tokens", "_text_chars", "_usage", "done")

    def __init__(self, prompt_tokens: int, keep_usage: bool) -> None:
        self._prompt_tokens = prompt_tokens
        self._keep_usage = keep_usage
        self._text_chars = 0
        self._usage: Usage | None = None
        self.done = False  # [DONE] came

    def feed(self, block: bytes) -> bytes:
        if carries_usage(block) or _DONE in block:
            return b"".join([self._feed_event(event) for event in events_in(block)])
        if not self._keep_usage:
            block = strip_null_usage(block)
        self._text_chars += text_length(block)
        return block

    def _feed_event(self, event: bytes) -> bytes:
        if carries_usage(event):
            parsed = parse_event(event)
            found = usage_from(parsed) if parsed else None
            if found is not None:
                self._usage = found
                if not self._keep_usage and parsed is not None and not parsed.get("choices"):
                    return b""  # the usage-only chunk the client did not ask for
        elif not self._keep_usage:
            event = strip_null_usage(event)
        if is_done(event):
            self.done = True
        else:
            self._text_chars += text_length(event)
        return event

    def usage(self) -> Usage:
        if self._usage is not None:
            return self._usage
        return Usage(self._prompt_tokens, -(-self._text_chars // 4), 0)  # characters / 4
