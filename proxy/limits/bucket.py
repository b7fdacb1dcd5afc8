"""Token-bucket arithmetic in exact integers, shared by MemoryStore and mirrored by the Lua.

A bucket with a per-minute `rate` and a `capacity` (both in whole requests or tokens) keeps its
level in *units*: one request/token is `UNITS` units, so refilling `rate` per minute adds exactly
`rate` units per millisecond. Levels stay integers (exact in Lua's doubles below 2**53, i.e. for
capacities up to ~150 billion), and every wait is an exact ceiling in milliseconds.

An absent bucket is full. A level may be negative (debt) after a settlement reported more tokens
than were reserved; the bucket then admits nothing until it has refilled past the next cost.

`lua/admit.lua` and `lua/settle.lua` repeat these functions line by line: change both together.
"""

from __future__ import annotations

UNITS = 60_000  # units per request/token: one minute in milliseconds
TTL_MARGIN_MS = 1_000  # a bucket key outlives the moment it is full again by this much


def refill(level: int | None, ts_ms: int | None, now_ms: int, rate: int, capacity: int) -> int:
    """The level (units) at `now_ms` of a bucket last written at `ts_ms` with `level`."""
    cap = capacity * UNITS
    if level is None or ts_ms is None:
        return cap
    elapsed = max(0, now_ms - ts_ms)
    return min(cap, level + elapsed * rate)


def wait_ms(level: int, cost: int, rate: int) -> int:
    """Milliseconds until a bucket at `level` holds `cost` (0 if it already does)."""
    need = cost * UNITS
    if level >= need:
        return 0
    return -(-(need - level) // rate)


def reset_ms(level: int, rate: int, capacity: int) -> int:
    """Milliseconds until a bucket at `level` is full."""
    missing = capacity * UNITS - level
    if missing <= 0:
        return 0
    return -(-missing // rate)


def remaining(level: int) -> int:
    """Whole requests/tokens left at `level` (never negative)."""
    return max(0, level // UNITS)


def credit(level: int, amount: int, capacity: int) -> int:
    """`level` plus `amount` requests/tokens (negative: a charge), capped at capacity."""
    return min(capacity * UNITS, level + amount * UNITS)
