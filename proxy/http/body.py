"""Reading a request body: bounded while it streams in, then parsed as a JSON object."""

from __future__ import annotations

import orjson
from starlette.requests import ClientDisconnect, Request

from ..errors import BodyTooLarge, ClientClosedRequest, InvalidRequest

# The body is re-encoded for the upstream, and orjson.dumps refuses more than 254 levels (while
# orjson.loads takes 1024): anything deeper must be refused here, as the client's error.
MAX_JSON_DEPTH = 128


def _too_large(limit: int) -> BodyTooLarge:
    # `connection: close` makes uvicorn hang up after the 413 instead of reading (and discarding)
    # the rest of the body to keep the connection alive: a 1 GiB upload stops at the limit.
    return BodyTooLarge(f"Request body is larger than the proxy's limit of {limit} bytes.",
                        headers={"connection": "close"})


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
    chunks = []
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


def parse_json_object(raw: bytes) -> dict:
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


def _depth(value) -> int:
    """How many arrays and objects deep `value` goes (iterative: the input is the attacker's)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
