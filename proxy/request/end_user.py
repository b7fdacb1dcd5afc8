"""Who the end user of a call is: the first of `end_user_identity` the request carries.

`safety_identifier` and `user` come from the body, `x-proxy-end-user` from the headers. Only a
non-empty string counts; it is cut to `MAX_END_USER` characters (it names a Redis key). The name
never becomes a metric label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_END_USER = 256
HEADER = "x-proxy-end-user"


def end_user_of(body: Mapping[str, Any], headers: Mapping[str, str], sources: Sequence[str]) -> str | None:
    for source in sources:
        value = headers.get(HEADER) if source == HEADER else body.get(source)
        if isinstance(value, str) and value:
            return value[:MAX_END_USER]
    return None
