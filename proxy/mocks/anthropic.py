"""The Anthropic Messages API as the mock speaks it: messages, stream frames, errors, token counts.

Event order of a streamed message, each event with its `event:` line: message_start (usage with
the input split and output_tokens 1), content_block_start, ping, content_block_delta per word,
content_block_stop, message_delta (stop_reason and the cumulative usage), message_stop.
Input tokens are split the Anthropic way: `input_tokens` excludes the cache reads and writes, so
input_tokens + cache_creation_input_tokens + cache_read_input_tokens is the whole prompt.
"""

from __future__ import annotations

from typing import Any

import orjson

from .common import Output, Script, Tally, named_event, plan_output, text_tokens

ERROR_TYPES = {  # status -> Anthropic error type
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
REQUIRED_FIELDS = ("model", "messages", "max_tokens")


def error_body(status: int, message: str, request_id: str) -> bytes:
    kind = ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id})


def missing_field(body: dict[str, Any]) -> str | None:
    """The first required field the body lacks, for the API's `<field>: Field required` refusal."""
    return next((name for name in REQUIRED_FIELDS if name not in body), None)


def prompt_tokens(body: dict[str, Any]) -> int:
    return text_tokens([body.get("system"), body.get("messages")])


def usage_object(output: Output, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": output.input_tokens - output.cached_tokens - output.cache_write_tokens,
        "cache_creation_input_tokens": output.cache_write_tokens,
        "cache_read_input_tokens": output.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": output.cache_write_tokens, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


class MessageCall:
    """One POST /v1/messages under its fault: the message and the stream frames."""

    def __init__(self, body: dict[str, Any], fault: dict[str, Any], chunks: int, ident: int):
        cap = body.get("max_tokens")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise ValueError("max_tokens: Input should be a valid integer greater than or equal to 1")
        self.body = body
        self.id = f"msg_mock{ident:08d}"
        self.output = plan_output(prompt_tokens(body), cap, fault, chunks)
        self.report_usage = not fault.get("no_usage")
        self.stop_reason = "max_tokens" if self.output.truncated else "end_turn"

    def message(self, final: bool = True) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.body.get("model", ""),
            "content": [{"type": "text", "text": self.output.text}] if final else [],
            "stop_reason": self.stop_reason if final else None,
            "stop_sequence": None,
        }
        if self.report_usage:
            message["usage"] = usage_object(self.output, self.output.output_tokens if final else 1)
        return message

    def tally(self) -> Tally | None:
        if not self.report_usage:
            return None
        output = self.output
        return Tally(output.input_tokens, output.output_tokens, output.cached_tokens, output.cache_write_tokens)

    def script(self) -> Script:
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
        }
        if self.report_usage:
            usage = usage_object(self.output, self.output.output_tokens)
            delta["usage"] = {
                name: usage[name]
                for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
            }
        return Script(
            head=[
                named_event("message_start", {"type": "message_start", "message": self.message(final=False)}),
                named_event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                ),
                named_event("ping", {"type": "ping"}),
            ],
            deltas=[
                named_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                )
                for word in self.output.words
            ],
            tail=[
                named_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                named_event("message_delta", delta),
                named_event("message_stop", {"type": "message_stop"}),
            ],
            tally=self.tally(),
            error_frame=lambda _after: named_event(
                "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            ),
        )
