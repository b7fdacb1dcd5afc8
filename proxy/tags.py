"""Cost-attribution tags: `x-proxy-tags: role=security_auditor,workflow=nightly`, or OpenAI's
`metadata` object and `user` field. Bounded in number and size so the ledger stays small."""

from __future__ import annotations

import re
from typing import Any

MAX_TAGS = 8
_PART = re.compile(r"^[A-Za-z0-9_.:/@-]{1,64}$")


def _valid(name: str, value: str) -> bool:
    return bool(_PART.match(name)) and bool(_PART.match(value))


def parse_tags(header: str | None, body: dict[str, Any], end_user: str | None = None) -> tuple[tuple[str, str], ...]:
    """The request's tags; `end_user` (a verified JWT's user) is its `user` tag, whatever it says."""
    tags: dict[str, str] = {}
    if end_user is not None and _valid("user", end_user):
        tags["user"] = end_user
    if header:
        for item in header.split(","):
            name, sep, value = item.strip().partition("=")
            if sep and _valid(name.strip(), value.strip()):
                tags.setdefault(name.strip(), value.strip())
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        for name, value in metadata.items():
            if isinstance(name, str) and isinstance(value, str) and _valid(name, value):
                tags.setdefault(name, value)
    user = body.get("user")
    if isinstance(user, str) and _valid("user", user):
        tags.setdefault("user", user)
    return tuple(sorted(tags.items()))[:MAX_TAGS]
