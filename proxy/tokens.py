"""Cheap prompt-size estimates for admission: characters / 4, as OpenAI's own limiter counts.

The estimate only sizes the reservation; settlement replaces it with the upstream's reported
usage. Every function here accepts any JSON value and never raises: a field of the wrong type
counts 0 (request validation is the app's job, not this module's).
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

CHARS_PER_TOKEN = 4
IMAGE_PART_TOKENS = 85  # a fixed charge per image part; the image itself is not inspected
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators around each chat message
REPLY_PRIMING_TOKENS = 3  # the assistant header every chat reply starts with
# sent to the model as prompt text too: tool and function definitions, a JSON response schema
STRUCTURED_PROMPT_FIELDS = ("tools", "functions", "response_format")
ENDPOINTS = frozenset({"chat", "completions", "embeddings"})


def estimate_text_tokens(text: object) -> int:
    """ceil(len(text) / 4); 0 for an empty string or a non-string."""
    if not isinstance(text, str):
        return 0
    return -(-len(text) // CHARS_PER_TOKEN)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            total += estimate_text_tokens(part.get("text"))
        elif part.get("type") == "image_url":
            total += IMAGE_PART_TOKENS
    return total


def _function_call_tokens(call: Any) -> int:
    if not isinstance(call, dict):
        return 0
    return estimate_text_tokens(call.get("name")) + estimate_text_tokens(call.get("arguments"))


def message_tokens(message: Any) -> int:
    if not isinstance(message, dict):
        return 0
    total = MESSAGE_OVERHEAD_TOKENS
    total += _content_tokens(message.get("content"))
    total += estimate_text_tokens(message.get("name"))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        total += sum(_function_call_tokens(call.get("function")) for call in tool_calls if isinstance(call, dict))
    total += _function_call_tokens(message.get("function_call"))  # the legacy single call
    return total


def json_tokens(value: Any) -> int:
    """Structured prompt parts (tool definitions, a response schema, a tool's JSON input): their JSON text / 4."""
    if value is None:
        return 0
    try:
        return estimate_text_tokens(orjson.dumps(value).decode())
    except (orjson.JSONEncodeError, TypeError):
        return 0


def _chat_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    structured = sum(json_tokens(body.get(field)) for field in STRUCTURED_PROMPT_FIELDS)
    if not isinstance(messages, list):
        return structured
    return sum(message_tokens(message) for message in messages) + REPLY_PRIMING_TOKENS + structured


def _prompt_tokens(value: Any) -> int:
    """A string, a token array, or a list of strings or token arrays."""
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += estimate_text_tokens(item)
        elif _is_int(item):
            total += 1
        elif isinstance(item, list):
            total += sum(1 for token in item if _is_int(token))
    return total


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """The estimated prompt tokens of a request body for `endpoint` (chat, completions, embeddings).

    Raises ValueError only for an unknown endpoint name (a programming error, not a bad request).
    """
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    if not isinstance(body, dict):
        return 0
    if endpoint == "chat":
        return _chat_tokens(body)
    if endpoint == "completions":
        return _prompt_tokens(body.get("prompt"))
    return _prompt_tokens(body.get("input"))


def max_output_tokens(body: dict[str, Any], default: int) -> int:
    """The most output tokens the request may produce: its cap (or `default`) times `n`.

    With both `max_completion_tokens` and `max_tokens`, the larger: an upstream may honour either,
    so the reservation must cover the one that lets it write more. A cap that is missing, null,
    negative or not an integer is ignored. `n` counts only when it is an integer above 1.
    """
    if not isinstance(body, dict):
        return default
    caps: list[int] = []
    for field in ("max_completion_tokens", "max_tokens"):
        value: object = body.get(field)
        if _is_int(value) and value >= 0:
            caps.append(value)
    cap = max(caps) if caps else default
    n: object = body.get("n")
    if _is_int(n) and n > 1:
        cap *= n
    return cap
