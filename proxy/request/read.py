"""The read stage: the bounded body, its JSON, the call in it, its model and the context policy.

Everything a client can get wrong in its request is refused here, before admission, with
OpenAI's messages and `param`s: a body too large or not JSON, a malformed call
(`proxy.request.call`), an unknown model or one this key may not use, a prompt that does not fit
the model's context window (or, with `context_overflow: truncate`, old messages dropped until it
does).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from ..config import Config, Model
from ..errors import (
    BodyTooLarge,
    ClientClosedRequest,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
)
from ..tokens import message_tokens
from .authenticate import Caller
from .call import API_ENDPOINTS, Call, parse_call

# The body is re-encoded for the upstream, and orjson.dumps refuses more than 254 levels (while
# orjson.loads takes 1024): anything deeper must be refused here, as the client's error.
MAX_JSON_DEPTH = 128


def _too_large(limit: int) -> BodyTooLarge:
    # `connection: close` makes uvicorn hang up after the 413 instead of reading (and discarding)
    # the rest of the body to keep the connection alive: a 1 GiB upload stops at the limit.
    return BodyTooLarge(
        f"Request body is larger than the proxy's limit of {limit} bytes.", headers={"connection": "close"}
    )


async def read_call(
    request: Request, endpoint: str, caller: Caller, config: Config, deployment: str | None = None
) -> tuple[Call, Model]:
    """The call the client sent, with the model config it names (as of the request's snapshot);
    an Azure-style path names the model as its `deployment`."""
    raw = await read_body(request, config.max_body_bytes)
    body = parse_json_object(raw)
    if deployment is not None:
        body["model"] = deployment
    name = body.get("model")
    model = config.models.get(name) if isinstance(name, str) else None
    call = parse_call(endpoint, body, model.default_max_tokens if model else None)
    if model is None:
        raise ModelNotFound(f"The model `{call.model}` does not exist or you do not have access to it.", param="model")
    if not caller.may_use(call.model):
        raise ModelNotAllowed(f"This key is not allowed to use the model `{call.model}`.", param="model")
    api = config.api_of(model)
    if api != call.api:
        raise InvalidRequest(
            f"The model `{call.model}` is served by the {api} API: call it on {API_ENDPOINTS[api]}.", param="model"
        )
    call.prompt_tokens = apply_context_policy(model, endpoint, body, call.prompt_tokens, call.max_output)
    return call, model


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosedRequest("The client closed the connection before it sent the whole body.") from None
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("We could not parse the JSON body of your request: the body is empty.")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "the body is not valid UTF-8" if "utf-8" in str(exc).lower() else "the body is not valid JSON"
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {reason}. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("The JSON body of your request must be an object.")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep.")
    return value


def _depth(value: dict[str, Any] | list[Any]) -> int:
    """How many arrays and objects deep `value` goes (iterative: the input is the attacker's)."""
    deepest = 0
    pending: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


# -- the context window ---------------------------------------------------------------------------
def _exceeded(window: int, prompt: int, output: int) -> ContextLengthExceeded:
    return ContextLengthExceeded(
        f"This model's maximum context length is {window} tokens. However, you requested about "
        f"{prompt + output} tokens ({prompt} in the messages, {output} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="messages",
    )


def apply_context_policy(model: Model, endpoint: str, body: dict[str, Any], prompt: int, output: int) -> int:
    """Returns the (possibly reduced) prompt estimate; may drop old messages from `body` in place."""
    window = model.context_window
    if window is None or prompt + output <= window:
        return prompt
    if model.context_overflow != "truncate" or endpoint != "chat":
        raise _exceeded(window, prompt, output)
    messages: list[dict[str, Any]] = body["messages"]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    always_kept = {i for i, m in enumerate(messages) if m.get("role") in ("system", "developer")} | {last_user}
    dropped: set[int] = set()
    for index in (i for i in range(len(messages)) if i not in always_kept):  # oldest first
        dropped.add(index)
        prompt -= message_tokens(messages[index])  # each message is estimated once: linear, not quadratic
        if prompt + output <= window:
            body["messages"] = [m for i, m in enumerate(messages) if i not in dropped]
            return prompt
    raise _exceeded(window, prompt, output)
