"""POST /v1/messages and /v1/messages/count_tokens: the fields the proxy reads, usage, the stream meter.

Refusals are `InvalidRequest`s worded as Anthropic words them (`<field>: Field required`);
`anthropic_errors` turns them into Anthropic's error shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

from ..errors import InvalidRequest
from ..limits.types import Usage
from ..tokens import REPLY_PRIMING_TOKENS, json_tokens
from .estimate import items_tokens
from .responses import event_name, event_payload
from .usage import count, estimated_output

MAX_TOKENS_CEILING = 2**31 - 1
# the produced text of a content_block_delta: text, a tool's partial JSON, thinking
_DELTA_TEXT = re.compile(rb'"(?:text|partial_json|thinking)": ?"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class MessagesCall:
    model: str
    stream: bool
    prompt_tokens: int  # estimated: system + messages + tools
    max_output: int  # reserved output: max_tokens (0 for count_tokens)


def _invalid(location: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{location}: {problem}", param=location)


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _invalid("messages", "Field required")
    if not isinstance(messages, list):
        raise _invalid("messages", "Input should be a valid list")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise _invalid(where, "Input should be a valid dictionary")
        if "role" not in message:
            raise _invalid(f"{where}.role", "Field required")
        if message["role"] not in ("user", "assistant"):
            raise _invalid(f"{where}.role", "Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise _invalid(f"{where}.content", "Field required")
        if not isinstance(message["content"], (str, list)):
            raise _invalid(f"{where}.content", "Input should be a valid string or a list of content blocks")


def parse_messages_call(body: dict[str, Any], *, count_tokens: bool = False) -> MessagesCall:
    """Validates what the proxy reads from a /v1/messages (or, `count_tokens`, a count) body.

    `max_tokens` is required for messages (this API has no default); a count reserves nothing.
    Raises InvalidRequest with Anthropic's wording and the field's location as `param`.
    """
    model = body.get("model")
    if model is None:
        raise _invalid("model", "Field required")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "Input should be a valid string")
    messages = body.get("messages")
    _check_messages(messages)
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _invalid("system", "Input should be a valid string or a list of text blocks")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _invalid("tools", "Input should be a valid list")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "Input should be a valid boolean")
    max_output = 0
    if not count_tokens:
        cap = body.get("max_tokens")
        if cap is None:
            raise _invalid("max_tokens", "Field required")
        if not isinstance(cap, int) or isinstance(cap, bool):
            raise _invalid("max_tokens", "Input should be a valid integer")
        if not 1 <= cap <= MAX_TOKENS_CEILING:
            bound = "greater than or equal to 1" if cap < 1 else f"less than or equal to {MAX_TOKENS_CEILING}"
            raise _invalid("max_tokens", f"Input should be {bound}")
        max_output = cap
    return MessagesCall(
        model=model,
        stream=bool(stream) and not count_tokens,
        prompt_tokens=items_tokens(messages) + REPLY_PRIMING_TOKENS + items_tokens(system) + json_tokens(tools),
        max_output=max_output,
    )


def usage_from_message(message: Any) -> Usage | None:
    """The `usage` of a message (a plain reply, or message_start's `message`); None if absent."""
    usage = message.get("usage") if isinstance(message, dict) else None
    if not isinstance(usage, dict):
        return None
    uncached = count(usage.get("input_tokens"))
    written = count(usage.get("cache_creation_input_tokens"))
    read = count(usage.get("cache_read_input_tokens"))
    return Usage(
        prompt_tokens=uncached + written + read,
        completion_tokens=count(usage.get("output_tokens")),
        cached_tokens=read,
        cache_write_tokens=written,
    )


class MessagesStreamMeter:
    """Fed every event of a streamed message (unchanged bytes, ping included), it yields the usage
    at the end: message_start's input split and message_delta's cumulative output_tokens (a later
    message_delta's input fields, when present, replace message_start's); when the stream was
    cut before message_delta, the output is the characters / 4 of the produced deltas (at least
    what message_start reported) and the input message_start's, else `prompt_tokens`.
    """

    __slots__ = ("_chars", "_delta_seen", "_prompt_tokens", "_started", "_usage")

    def __init__(self, prompt_tokens: int) -> None:
        self._prompt_tokens = prompt_tokens
        self._chars = 0
        self._usage: dict[str, Any] = {}
        self._started = False
        self._delta_seen = False

    def feed(self, event: bytes) -> None:
        name = event_name(event)
        if name in (b"content_block_delta", b"ping"):
            self._count_text(event)
            return
        payload = event_payload(event)
        if payload is None:
            return
        kind = payload.get("type")
        if kind == "content_block_delta":  # an event without its `event:` line
            self._count_text(event)
        elif kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._usage.update(usage)
                self._started = True
        elif kind == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self._usage.update({key: value for key, value in usage.items() if value is not None})
                self._delta_seen = "output_tokens" in usage

    def _count_text(self, event: bytes) -> None:
        for match in _DELTA_TEXT.finditer(event):
            self._chars += len(match.group(1))

    @property
    def finished(self) -> bool:
        """The upstream reported the final output count (message_delta)."""
        return self._delta_seen

    def usage(self) -> Usage:
        reported = usage_from_message({"usage": self._usage}) if self._started or self._delta_seen else None
        if reported is None:
            return Usage(prompt_tokens=self._prompt_tokens, completion_tokens=estimated_output(self._chars))
        if self._delta_seen:
            return reported
        output = max(reported.completion_tokens, estimated_output(self._chars))
        return replace(reported, completion_tokens=output)


def error_event(error_type: str, message: str) -> bytes:
    """Anthropic's `error` event, as it ends a stream mid-way (e.g. overloaded_error, api_error)."""
    payload = {"type": "error", "error": {"type": error_type, "message": message}}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
