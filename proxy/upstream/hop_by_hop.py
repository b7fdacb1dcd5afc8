"""Which of a client's request headers go on to the upstream (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable

PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


def forwarded_headers(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> dict[str, str]:
    """`headers` (lower-case names) without the `drop` names nor any header a `Connection` header
    names: those are options for this hop only, whatever their case."""
    items = list(headers)
    kept = {name: value for name, value in items if name not in drop}
    named = {token.strip().lower() for name, value in items if name == "connection" for token in value.split(",")}
    named -= PLAIN_CONNECTION
    if named:
        kept = {name: value for name, value in kept.items() if name not in named}
    return kept
