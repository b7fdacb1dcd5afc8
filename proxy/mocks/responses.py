"""The OpenAI Responses API as the mock speaks it: response objects, stream frames, input items.

Event order of a streamed response, each event with its `event:` line and a `sequence_number`
from 0: response.created, response.in_progress, [response.output_item.added/.done for a
reasoning item when the fault asks for reasoning tokens], response.output_item.added (the
message), response.content_part.added, response.output_text.delta per word,
response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed, or response.incomplete (reason max_output_tokens) when the cap cut the text.
Unlike the real API, any `max_output_tokens` >= 0 is accepted (the real minimum is 16), so tests
can ask for short replies, and any stored response can be streamed again (`replay`), not only a
background one.
"""

from __future__ import annotations

import time
from typing import Any

from .common import Output, Script, Tally, named_event, plan_output, text_tokens


def usage_object(output: Output) -> dict[str, Any]:
    return {
        "input_tokens": output.input_tokens,
        "input_tokens_details": {
            "cached_tokens": output.cached_tokens,
            "cache_write_tokens": output.cache_write_tokens,
        },
        "output_tokens": output.output_tokens,
        "output_tokens_details": {"reasoning_tokens": output.reasoning_tokens},
        "total_tokens": output.input_tokens + output.output_tokens,
    }


def tally(output: Output) -> Tally:
    return Tally(
        output.input_tokens,
        output.output_tokens,
        output.cached_tokens,
        output.cache_write_tokens,
        output.reasoning_tokens,
    )


def input_items(body: dict[str, Any], ident: int) -> list[dict[str, Any]]:
    """The request's `input` as the stored items GET /input_items lists (oldest first)."""
    raw = body.get("input")
    items: list[Any] = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw or []
    listed = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        item = dict(item)
        if item.get("type", "message") == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", f"msg_mockin{ident:08d}{position:04d}")
        listed.append(item)
    return listed


class ResponseCall:
    """One POST /v1/responses under its fault: the final response object and the stream frames."""

    def __init__(self, body: dict[str, Any], fault: dict[str, Any], chunks: int, ident: int):
        cap = body.get("max_output_tokens")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
            raise ValueError("max_output_tokens must be a non-negative integer")
        self.body = body
        self.id = f"resp_mock{ident:08d}"
        self.message_id = f"msg_mock{ident:08d}"
        self.reasoning_id = f"rs_mock{ident:08d}"
        self.created_at = int(time.time())
        self.output = plan_output(text_tokens([body.get("instructions"), body.get("input")]), cap, fault, chunks)
        self.report_usage = not fault.get("no_usage")
        self.status = "incomplete" if self.output.truncated else "completed"

    @property
    def has_message(self) -> bool:
        return bool(self.output.words) or not self.output.reasoning_tokens

    def reasoning_item(self) -> dict[str, Any]:
        return {"id": self.reasoning_id, "type": "reasoning", "summary": []}

    def message_item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self.text_part(text)]
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def output_items(self) -> list[dict[str, Any]]:
        items = [self.reasoning_item()] if self.output.reasoning_tokens else []
        if self.has_message:
            items.append(self.message_item(self.status, self.output.text))
        return items

    def response(self, status: str | None = None, final: bool = True) -> dict[str, Any]:
        """The response object: `final` carries output and usage, otherwise the in-progress shell."""
        status = status or self.status
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": self.created_at if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {},
            "model": body.get("model", ""),
            "output": self.output_items() if final else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage_object(self.output) if final and self.report_usage else None,
            "user": None,
        }

    def tally(self) -> Tally | None:
        return tally(self.output) if self.report_usage else None

    def script(self) -> Script:
        frames: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": self.response("in_progress", final=False)}),
            ("response.in_progress", {"response": self.response("in_progress", final=False)}),
        ]
        index = 0
        if self.output.reasoning_tokens:
            frames.append(("response.output_item.added", {"output_index": 0, "item": self.reasoning_item()}))
            frames.append(("response.output_item.done", {"output_index": 0, "item": self.reasoning_item()}))
            index = 1
        where = {"item_id": self.message_id, "output_index": index}
        deltas: list[tuple[str, dict[str, Any]]] = []
        tail: list[tuple[str, dict[str, Any]]] = []
        if self.has_message:
            frames.append(
                ("response.output_item.added", {"output_index": index, "item": self.message_item("in_progress", None)})
            )
            frames.append(("response.content_part.added", where | {"content_index": 0, "part": self.text_part("")}))
            deltas = [
                ("response.output_text.delta", where | {"content_index": 0, "delta": word, "logprobs": []})
                for word in self.output.words
            ]
            text = self.output.text
            tail = [
                ("response.output_text.done", where | {"content_index": 0, "text": text, "logprobs": []}),
                ("response.content_part.done", where | {"content_index": 0, "part": self.text_part(text)}),
                ("response.output_item.done", {"output_index": index, "item": self.message_item(self.status, text)}),
            ]
        tail.append((f"response.{self.status}", {"response": self.response()}))

        def frame(name: str, payload: dict[str, Any], sequence: int) -> bytes:
            return named_event(name, {"type": name, "sequence_number": sequence} | payload)

        head_count = len(frames)
        ordered = frames + deltas + tail
        encoded = [frame(name, payload, sequence) for sequence, (name, payload) in enumerate(ordered)]

        def error_frame(after: int) -> bytes:
            return frame(
                "error",
                {"code": "server_error", "message": "mock fault: the model failed mid-stream", "param": None},
                head_count + after,
            )

        return Script(
            head=encoded[:head_count],
            deltas=encoded[head_count : head_count + len(deltas)],
            tail=encoded[head_count + len(deltas) :],
            tally=self.tally(),
            error_frame=error_frame,
        )


def replay(script: Script, starting_after: int | None) -> Script:
    """A stored response's stream as GET /v1/responses/{id}?stream=true sends it again: the events
    after sequence number `starting_after` (all of them without it), reporting no new usage."""
    skip = 0 if starting_after is None else starting_after + 1
    head_skip = min(skip, len(script.head))
    delta_skip = min(skip - head_skip, len(script.deltas))
    tail_skip = skip - head_skip - delta_skip
    return Script(
        head=script.head[head_skip:],
        deltas=script.deltas[delta_skip:],
        tail=script.tail[tail_skip:],
        tally=None,
        error_frame=lambda after: script.error_frame(delta_skip + after),
    )
