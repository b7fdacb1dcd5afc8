"""The fields of an OpenAI call the proxy needs, checked with OpenAI's messages and `param`s.

Only these fields are read; everything else in the body passes through untouched for the
upstream to judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..apis.anthropic import parse_messages_call
from ..apis.responses import parse_responses_call
from ..errors import InvalidRequest
from ..tokens import estimate_prompt_tokens, max_output_tokens

MAX_TOKENS_CEILING = 2**31 - 1
MAX_N = 128
REQUIRED_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
# the API each endpoint belongs to: a model serves the endpoints of its targets' API
API_OF = {
    "chat": "openai",
    "completions": "openai",
    "embeddings": "openai",
    "responses": "openai",
    "messages": "anthropic",
    "count_tokens": "anthropic",
}
API_ENDPOINTS = {"openai": "/v1/chat/completions or /v1/responses", "anthropic": "/v1/messages"}


@dataclass(slots=True)
class Call:
    endpoint: str  # chat | completions | embeddings | responses | messages | count_tokens
    body: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage set by the client
    prompt_tokens: int
    max_output: int  # reserved completion tokens (n × max_tokens)
    fallback_from: str | None = None  # the model asked for, when its budget fallback serves the call

    @property
    def api(self) -> str:
        return API_OF[self.endpoint]

    @property
    def charged(self) -> bool:
        """count_tokens is counted in the request buckets and never charged."""
        return self.endpoint != "count_tokens"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(body: dict[str, Any], param: str, ceiling: int) -> int | None:
    value: object = body.get(param)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest.invalid_type(param, "an integer", value)
    if value < 1:
        raise InvalidRequest(
            f"Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    if value > ceiling:
        raise InvalidRequest(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {ceiling}, but got {value} instead.",
            param=param,
            code="integer_above_max_value",
        )
    return value


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest.invalid_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
            code="empty_array",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest.invalid_type(f"messages[{i}]", "an object", message)
        if not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"Missing required parameter: 'messages[{i}].role'.",
                param=f"messages[{i}].role",
                code="missing_required_parameter",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest.invalid_type(f"messages[{i}].content", "one of a string or array of objects", content)


def _check_text_input(param: str, value: object) -> None:
    if isinstance(value, str):
        return
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(item, str) or _is_int(item) or (isinstance(item, list) and all(_is_int(x) for x in item))
            for item in value
        )
    ):
        return
    raise InvalidRequest.invalid_type(param, "a string or an array of strings or tokens", value)


def parse_call(endpoint: str, body: dict[str, Any], default_max_tokens: int | None = None) -> Call:
    """Validates what the proxy reads; raises InvalidRequest with `param` on the first problem."""
    if endpoint in ("responses", "messages", "count_tokens"):
        return _agent_call(endpoint, body, default_max_tokens or 0)
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise InvalidRequest.invalid_type("model", "a string", model)
    field = REQUIRED_FIELD[endpoint]
    if field not in body:
        raise InvalidRequest(f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter")
    if endpoint == "chat":
        _check_messages(body["messages"])
    else:
        _check_text_input(field, body[field])
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest.invalid_type("stream", "a boolean", stream)
    if endpoint == "embeddings":
        stream = False
    wants_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest.invalid_type("stream_options", "an object", options)
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise InvalidRequest.invalid_type("stream_options.include_usage", "a boolean", include)
        wants_usage = bool(include)
    for param in ("max_tokens", "max_completion_tokens"):
        _positive_int(body, param, MAX_TOKENS_CEILING)
    _positive_int(body, "n", MAX_N)
    return Call(
        endpoint=endpoint,
        body=body,
        model=model,
        stream=stream,
        client_wants_usage=wants_usage,
        prompt_tokens=estimate_prompt_tokens(endpoint, body),
        max_output=0 if endpoint == "embeddings" else max_output_tokens(body, default_max_tokens or 0),
    )


def _agent_call(endpoint: str, body: dict[str, Any], default_max_tokens: int) -> Call:
    """A Responses or Messages call (their own readers, `proxy.apis`); count_tokens reserves nothing."""
    if endpoint == "responses":
        read = parse_responses_call(body, default_max_tokens)
        return Call(endpoint, body, read.model, read.stream, True, read.prompt_tokens, read.max_output)
    counting = endpoint == "count_tokens"
    message = parse_messages_call(body, count_tokens=counting)
    prompt = 0 if counting else message.prompt_tokens
    return Call(endpoint, body, message.model, message.stream, True, prompt, message.max_output)
