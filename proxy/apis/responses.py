"""POST /v1/responses: the fields the proxy reads, the usage a response reports, the stream meter.

Errors are OpenAI-shaped `InvalidRequest`s with OpenAI's wording and `param`, as for chat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import InvalidRequest
from ..limits.types import Usage
from ..tokens import json_tokens
from .estimate import items_tokens
from .usage import count, estimated_output

MAX_OUTPUT_TOKENS_CEILING = 2**31 - 1
FINAL_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_DELTA = re.compile(rb'"delta": ?"((?:[^"\\]|\\.)*)"')
_SEQUENCE = re.compile(rb'"sequence_number": ?(\d+)')


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    model: str
    stream: bool
    previous_response_id: str | None  # route to the upstream that created it
    prompt_tokens: int  # estimated: instructions + input + tools
    max_output: int  # reserved output: max_output_tokens, else the default


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def _optional(body: dict[str, Any], param: str, kind: type, expected: str) -> Any:
    value = body.get(param)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise InvalidRequest.invalid_type(param, expected, value)
    return value


def parse_responses_call(body: dict[str, Any], default_max_tokens: int) -> ResponsesCall:
    """Validates what the proxy reads from a POST /v1/responses body; raises InvalidRequest."""
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest.invalid_type("model", "a string", model)
    previous = _optional(body, "previous_response_id", str, "a string")
    prompt = body.get("input")
    if prompt is None and previous is None and body.get("prompt") is None and body.get("conversation") is None:
        raise _missing("input")
    if prompt is not None:
        if not isinstance(prompt, (str, list)):
            raise InvalidRequest.invalid_type("input", "one of a string or array of input items", prompt)
        if isinstance(prompt, list):
            for index, item in enumerate(prompt):
                if not isinstance(item, dict):
                    raise InvalidRequest.invalid_type(f"input[{index}]", "an object", item)
    instructions = _optional(body, "instructions", str, "a string")
    tools = _optional(body, "tools", list, "an array")
    stream = bool(_optional(body, "stream", bool, "a boolean"))
    if _optional(body, "background", bool, "a boolean"):
        raise InvalidRequest(
            "Background responses are not supported through this proxy: it meters a response while it "
            "streams or returns it. Send the request without 'background'.",
            param="background",
            code="unsupported_parameter",
        )
    cap = _optional(body, "max_output_tokens", int, "an integer")
    if cap is not None and not 1 <= cap <= MAX_OUTPUT_TOKENS_CEILING:
        below = cap < 1
        bound = "below minimum" if below else "above maximum"
        expected = ">= 1" if below else f"<= {MAX_OUTPUT_TOKENS_CEILING}"
        raise InvalidRequest(
            f"Invalid 'max_output_tokens': integer {bound} value. Expected a value {expected}, but got {cap} instead.",
            param="max_output_tokens",
            code="integer_below_min_value" if below else "integer_above_max_value",
        )
    return ResponsesCall(
        model=model,
        stream=stream,
        previous_response_id=previous,
        prompt_tokens=items_tokens(prompt) + items_tokens(instructions) + json_tokens(tools),
        max_output=default_max_tokens if cap is None else cap,
    )


def usage_from_response(response: Any) -> Usage | None:
    """The `usage` of a response object (plain reply, or the `response` of a final event); None if absent."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    input_details = usage.get("input_tokens_details")
    input_details = input_details if isinstance(input_details, dict) else {}
    output_details = usage.get("output_tokens_details")
    output_details = output_details if isinstance(output_details, dict) else {}
    prompt = count(usage.get("input_tokens"))
    output = count(usage.get("output_tokens"))
    cached = min(count(input_details.get("cached_tokens")), prompt)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        cached_tokens=cached,
        cache_write_tokens=min(count(input_details.get("cache_write_tokens")), prompt - cached),
        reasoning_tokens=min(count(output_details.get("reasoning_tokens")), output),
    )


def event_name(event: bytes) -> bytes:
    """The `event:` field of one SSE event (b"" when it has none)."""
    if not event.startswith(b"event:"):
        return b""
    end = event.find(b"\n")
    return event[6:end].strip()


def event_payload(event: bytes) -> dict[str, Any] | None:
    data = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class ResponsesStreamMeter:
    """Fed every event of a streamed response (unchanged bytes, one complete event each), it yields
    the usage at the end: the final event's (response.completed / .incomplete / .failed), or,
    when the stream was cut before it, `prompt_tokens` and the characters / 4 of produced deltas.

    Events without an `event:` line are read by their data's `type`.
    """

    __slots__ = ("_chars", "_last", "_prompt_tokens", "_reported")

    def __init__(self, prompt_tokens: int) -> None:
        self._prompt_tokens = prompt_tokens
        self._chars = 0
        self._reported: Usage | None = None
        self._last = b""  # the last event, read for its sequence_number only if an error event follows

    def feed(self, event: bytes) -> None:
        name = event_name(event)
        if not name:
            payload = event_payload(event)
            kind = payload.get("type") if payload else None
            name = kind.encode() if isinstance(kind, str) else b""
        if name.endswith(b".delta"):
            match = _DELTA.search(event)
            if match:
                self._chars += len(match.group(1))
        elif name in FINAL_EVENTS:
            payload = event_payload(event)
            if payload is not None:
                self._reported = usage_from_response(payload.get("response")) or self._reported
        self._last = event

    @property
    def finished(self) -> bool:
        """The upstream reported the final usage."""
        return self._reported is not None

    def usage(self) -> Usage:
        if self._reported is not None:
            return self._reported
        return Usage(prompt_tokens=self._prompt_tokens, completion_tokens=estimated_output(self._chars))

    def error_event(self, message: str, code: str = "upstream_error") -> bytes:
        """The `error` event that ends a stream the upstream broke, numbered after the last event seen."""
        last = _SEQUENCE.search(self._last)
        payload = {
            "type": "error",
            "code": code,
            "message": message,
            "param": None,
            "sequence_number": int(last.group(1)) + 1 if last else 0,
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
