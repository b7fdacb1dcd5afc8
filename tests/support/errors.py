"""OpenAI's error body, to assert a proxy error whole: status, message, type, param and code.

    assert error_reply(response) == (401, openai_error(WRONG_KEY, INVALID, "invalid_api_key"))

A message that names a wall-clock instant (a budget's reset, say) is matched with
`clocked("...; it resets at {instant}.")`: every other character must be exact.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import orjson

INVALID = "invalid_request_error"
NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."

_CLOCK_PARTS = {"{instant}": r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"}  # RFC 3339, in UTC


def openai_error(message: str | Matching, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_reply(response: httpx.Response) -> tuple[int, Any]:
    """(status, parsed body): compared at once, a mismatch shows both."""
    return response.status_code, orjson.loads(response.content)


class Matching:
    """Equal to a string that matches `pattern` whole."""

    __hash__ = None

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.pattern.fullmatch(other) is not None

    def __repr__(self) -> str:
        return f"Matching({self.pattern.pattern!r})"


def clocked(template: str) -> Matching:
    """`template` exactly, except that `{instant}` stands for any instant in UTC."""
    pieces = re.split(r"(\{instant\})", template)
    return Matching("".join(_CLOCK_PARTS.get(piece) or re.escape(piece) for piece in pieces))
