"""A Redis keyspace in this process: the commands the store's Lua scripts call, with Redis' replies.

`MemoryStore` runs the very same scripts as Redis (`proxy/limits/lua/*.lua`) against this, so
the limit, lease and budget rules have one definition. Only what the scripts use is here: strings,
hashes and sorted sets, expiry in the store's clock (milliseconds), and the reply types Redis
hands a script (integers, strings, None for a nil bulk reply, lists, `Status`). An aggregate that
loses its last member is deleted, with its expiry, as in Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar, Union

SWEEP_EVERY = 1_000  # commands between sweeps of expired keys
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


class Hash(dict[str, str]):
    """A hash: field -> value."""


class SortedSet(dict[str, float]):
    """A sorted set: member -> score."""


Value = str | Hash | SortedSet
Reply = Union[int, str, None, "Status", list["Reply"]]
Aggregate = TypeVar("Aggregate", Hash, SortedSet)


class Status(str):
    """A status reply ("OK"): a script sees it as a table with the field `ok`."""


class CommandError(Exception):
    """What Redis would answer with an error reply (a script's `redis.call` raises it)."""


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CommandError("ERR value is not an integer or out of range") from None


def _score(value: str) -> float:
    text = value.lower()
    if text in ("-inf", "+inf", "inf"):
        return float(text if text != "inf" else "+inf")
    try:
        return float(value)
    except ValueError:
        raise CommandError("ERR min or max is not a float") from None


def _bound(value: str) -> tuple[float, bool]:
    """A ZRANGEBYSCORE bound: (score, exclusive)."""
    if value.startswith("("):
        return _score(value[1:]), True
    return _score(value), False


def format_score(score: float) -> str:
    """A score as Redis prints it (integers without a fraction)."""
    return str(int(score)) if score.is_integer() else repr(score)


class Keyspace:
    """Named values with expiry; `call(now_ms, command, *args)` answers like Redis."""

    def __init__(self) -> None:
        self._values: dict[str, Value] = {}
        self._expires: dict[str, int] = {}
        self._ops = 0
        self._commands: dict[str, Callable[..., Reply]] = {
            name[4:].upper(): getattr(self, name) for name in dir(self) if name.startswith("cmd_")
        }

    # -- the keyspace itself ---------------------------------------------------------------------
    def names(self, now_ms: int) -> Iterator[str]:
        return (name for name in list(self._values) if self._live(name, now_ms) is not None)

    def pttl(self, name: str, now_ms: int) -> int:
        if self._live(name, now_ms) is None:
            return -2
        at = self._expires.get(name)
        return -1 if at is None else at - now_ms

    def hash(self, name: str, now_ms: int) -> dict[str, str]:
        """A hash's fields (empty when absent): for reads outside the scripts."""
        value = self._live(name, now_ms)
        return dict(value) if isinstance(value, Hash) else {}

    def sweep(self, now_ms: int) -> None:
        for name in [n for n, at in self._expires.items() if at <= now_ms]:
            self._delete(name)

    def _live(self, name: str, now_ms: int) -> Value | None:
        at = self._expires.get(name)
        if at is not None and at <= now_ms:
            self._delete(name)
            return None
        return self._values.get(name)

    def _delete(self, name: str) -> bool:
        self._expires.pop(name, None)
        return self._values.pop(name, None) is not None

    def _get(self, name: str, now_ms: int, kind: type[Aggregate]) -> Aggregate | None:
        value = self._live(name, now_ms)
        if value is not None and not isinstance(value, kind):
            raise CommandError(WRONGTYPE)
        return value

    def _make(self, name: str, now_ms: int, kind: type[Aggregate]) -> Aggregate:
        value = self._get(name, now_ms, kind)
        if value is None:
            value = self._values[name] = kind()
        return value

    def _drop_if_empty(self, name: str) -> None:
        if name in self._values and not self._values[name]:
            self._delete(name)

    # -- dispatch --------------------------------------------------------------------------------
    def call(self, now_ms: int, command: str, *args: str) -> Reply:
        handler = self._commands.get(command.upper())
        if handler is None:
            raise CommandError(f"ERR unknown command '{command}' (not in the in-process store)")
        self._ops += 1
        if self._ops % SWEEP_EVERY == 0:
            self.sweep(now_ms)
        try:
            return handler(now_ms, *args)
        except TypeError:
            raise CommandError(f"ERR wrong number of arguments for '{command.lower()}' command") from None

    # -- keys ------------------------------------------------------------------------------------
    def cmd_del(self, now_ms: int, *names: str) -> int:
        return sum(self._live(n, now_ms) is not None and self._delete(n) for n in names)

    def cmd_exists(self, now_ms: int, *names: str) -> int:
        return sum(self._live(n, now_ms) is not None for n in names)

    def cmd_pexpire(self, now_ms: int, name: str, ms: str) -> int:
        if self._live(name, now_ms) is None:
            return 0
        self._expires[name] = now_ms + _int(ms)
        if _int(ms) <= 0:
            self._delete(name)
        return 1

    def cmd_expire(self, now_ms: int, name: str, seconds: str) -> int:
        return self.cmd_pexpire(now_ms, name, str(_int(seconds) * 1000))

    def cmd_pttl(self, now_ms: int, name: str) -> int:
        return self.pttl(name, now_ms)

    def cmd_ttl(self, now_ms: int, name: str) -> int:
        ms = self.pttl(name, now_ms)
        return ms if ms < 0 else (ms + 500) // 1000

    # -- strings ---------------------------------------------------------------------------------
    def cmd_get(self, now_ms: int, name: str) -> Reply:
        value = self._live(name, now_ms)
        if value is not None and not isinstance(value, str):
            raise CommandError(WRONGTYPE)
        return value

    def cmd_set(self, now_ms: int, name: str, value: str, *options: str) -> Reply:
        flags = [o.upper() for o in options]
        ttl_ms: int | None = None
        for unit, factor in (("EX", 1000), ("PX", 1)):
            if unit in flags:
                ttl_ms = _int(options[flags.index(unit) + 1]) * factor
        exists = self._live(name, now_ms) is not None
        if ("NX" in flags and exists) or ("XX" in flags and not exists):
            return None
        keep = "KEEPTTL" in flags and name in self._expires
        self._values[name] = value
        if ttl_ms is not None:
            self._expires[name] = now_ms + ttl_ms
        elif not keep:
            self._expires.pop(name, None)
        return Status("OK")

    def cmd_incrby(self, now_ms: int, name: str, amount: str) -> int:
        current = self.cmd_get(now_ms, name)
        total = _int(current if isinstance(current, str) else "0") + _int(amount)
        self._values[name] = str(total)
        return total

    # -- hashes ----------------------------------------------------------------------------------
    def cmd_hget(self, now_ms: int, name: str, field: str) -> Reply:
        fields = self._get(name, now_ms, Hash)
        return None if fields is None else fields.get(field)

    def cmd_hmget(self, now_ms: int, name: str, *fields: str) -> Reply:
        values: dict[str, str] = self._get(name, now_ms, Hash) or {}
        return [values.get(f) for f in fields]

    def cmd_hgetall(self, now_ms: int, name: str) -> Reply:
        values: dict[str, str] = self._get(name, now_ms, Hash) or {}
        return [item for pair in values.items() for item in pair]

    def cmd_hset(self, now_ms: int, name: str, *pairs: str) -> int:
        if not pairs or len(pairs) % 2:
            raise CommandError("ERR wrong number of arguments for 'hset' command")
        fields = self._make(name, now_ms, Hash)
        added = 0
        for field, value in zip(pairs[::2], pairs[1::2], strict=True):
            added += field not in fields
            fields[field] = value
        return added

    def cmd_hsetnx(self, now_ms: int, name: str, field: str, value: str) -> int:
        fields = self._make(name, now_ms, Hash)
        if field in fields:
            return 0
        fields[field] = value
        return 1

    def cmd_hincrby(self, now_ms: int, name: str, field: str, amount: str) -> int:
        fields = self._make(name, now_ms, Hash)
        total = _int(fields.get(field, "0")) + _int(amount)
        fields[field] = str(total)
        return total

    def cmd_hdel(self, now_ms: int, name: str, *fields: str) -> int:
        values = self._get(name, now_ms, Hash)
        if values is None:
            return 0
        removed = sum(values.pop(f, None) is not None for f in fields)
        self._drop_if_empty(name)
        return removed

    def cmd_hexists(self, now_ms: int, name: str, field: str) -> int:
        return int(field in (self._get(name, now_ms, Hash) or {}))

    def cmd_hlen(self, now_ms: int, name: str) -> int:
        return len(self._get(name, now_ms, Hash) or {})

    # -- sorted sets -----------------------------------------------------------------------------
    def cmd_zadd(self, now_ms: int, name: str, *args: str) -> int:
        flags: set[str] = set()
        rest = list(args)
        while rest and rest[0].upper() in ("NX", "XX", "GT", "LT", "CH"):
            flags.add(rest.pop(0).upper())
        if not rest or len(rest) % 2:
            raise CommandError("ERR syntax error")
        pairs = [(_score(score), member) for score, member in zip(rest[::2], rest[1::2], strict=True)]
        members = self._get(name, now_ms, SortedSet) if "XX" in flags else self._make(name, now_ms, SortedSet)
        if members is None:
            return 0
        added = changed = 0
        for score, member in pairs:
            old = members.get(member)
            if old is None:
                if "XX" in flags:
                    continue
                members[member] = score
                added += 1
                continue
            if "NX" in flags or ("GT" in flags and score <= old) or ("LT" in flags and score >= old):
                continue
            if score != old:
                members[member] = score
                changed += 1
        self._drop_if_empty(name)
        return added + changed if "CH" in flags else added

    def cmd_zrem(self, now_ms: int, name: str, *names: str) -> int:
        members = self._get(name, now_ms, SortedSet)
        if members is None:
            return 0
        removed = sum(members.pop(m, None) is not None for m in names)
        self._drop_if_empty(name)
        return removed

    def cmd_zscore(self, now_ms: int, name: str, member: str) -> Reply:
        scores: dict[str, float] = self._get(name, now_ms, SortedSet) or {}
        score = scores.get(member)
        return None if score is None else format_score(score)

    def cmd_zcard(self, now_ms: int, name: str) -> int:
        return len(self._get(name, now_ms, SortedSet) or {})

    def _in_range(self, name: str, now_ms: int, low: str, high: str) -> list[str]:
        (lo, lo_open), (hi, hi_open) = _bound(low), _bound(high)
        members: dict[str, float] = self._get(name, now_ms, SortedSet) or {}
        chosen = [
            (s, m) for m, s in members.items() if (s > lo if lo_open else s >= lo) and (s < hi if hi_open else s <= hi)
        ]
        return [m for _, m in sorted(chosen)]

    def cmd_zrangebyscore(self, now_ms: int, name: str, low: str, high: str) -> Reply:
        return list(self._in_range(name, now_ms, low, high))

    def cmd_zcount(self, now_ms: int, name: str, low: str, high: str) -> int:
        return len(self._in_range(name, now_ms, low, high))

    def cmd_zremrangebyscore(self, now_ms: int, name: str, low: str, high: str) -> int:
        chosen = self._in_range(name, now_ms, low, high)
        return self.cmd_zrem(now_ms, name, *chosen) if chosen else 0
