"""Reading a request body: bounded while it streams in, then parsed as a JSON object."""

from __future__ import annotations

import orjson
from starlette.requests import Request

from ..errors import BodyTooLarge, InvalidRequest


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"Request body is larger than the proxy's limit of {limit} bytes.")


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
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
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
    return value
