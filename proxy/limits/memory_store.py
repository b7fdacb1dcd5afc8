"""The store in this process (one replica, no Redis): Redis' own scripts on an embedded Lua 5.1.

The admit and settle rules exist once, in `lua/*.lua`: this store runs those files through lupa
(the Lua runtime fakeredis uses too) against `Keyspace`, which answers the Redis commands the
scripts call with Redis' replies. So it gives the same decisions, replies, key names and expiries
as Redis, which the conformance suite checks. A script never awaits: each runs atomically on the
event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lupa import lua51

from . import scripts
from .keyspace import CommandError, Keyspace, Reply, Status
from .layout import (
    DAY_MARGIN_MS,
    DEFAULT_PREFIX,
    LATE_BUDGET_TTL_S,
    Layout,
    admit_args,
    decode_decision,
    decode_held,
    decode_peek,
    decode_settled,
    held_args,
    hold_args,
    peek_args,
    renew_args,
    settle_args,
)
from .ledger import usage_report
from .types import (
    WINDOW_DAYS,
    Admission,
    Decision,
    HoldKind,
    Peek,
    Renewal,
    ScopeKind,
    ScopeLimits,
    Settled,
    Settlement,
    SharedHolds,
    WindowBudget,
)

DEFAULT_RETENTION_DAYS = 35


def system_clock_us() -> int:
    return time.time_ns() // 1000


class _Lua:
    """One Lua 5.1 runtime whose `redis.call` reaches a `Keyspace`, converting values both ways
    as Redis does for its scripts."""

    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace
        self.now_ms = 0
        self.runtime = lua51.LuaRuntime(encoding="utf-8", register_eval=False, register_builtins=False)
        self._table = self.runtime.table_from
        redis = self.runtime.table_from({"call": self._call, "pcall": self._pcall, "replicate_commands": lambda: True})
        self.runtime.globals().redis = redis
        # a script sees KEYS and ARGV as tables: each becomes a function of the two (declared on
        # its first line, so its error line numbers are Redis' too)
        self._compile = self.runtime.eval("function(source) return loadstring('local KEYS, ARGV = ... ' .. source) end")
        self._functions: dict[str, Any] = {}

    def run(self, name: str, keys: Sequence[str], args: Sequence[object], now_ms: int) -> Reply:
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = self._compile(scripts.source(name))
            if function is None:
                raise CommandError(f"ERR cannot compile {name}")
        self.now_ms = now_ms
        result = function(self._table(keys), self._table([a if type(a) is str else _arg(a) for a in args]))
        return self._from_lua(result)

    def _call(self, command: str, *args: object) -> object:
        reply = self.keyspace.call(self.now_ms, command, *[a if type(a) is str else _arg(a) for a in args])
        return reply if type(reply) is int or type(reply) is str else self._to_lua(reply)

    def _pcall(self, command: str, *args: object) -> object:
        try:
            return self._call(command, *args)
        except CommandError as exc:
            return self._table({"err": str(exc)})

    def _to_lua(self, reply: Reply) -> object:
        if reply is None:
            return False  # a nil bulk reply is false in a script
        if isinstance(reply, Status):
            return self._table({"ok": str(reply)})
        if isinstance(reply, list):
            return self._table([self._to_lua(item) for item in reply])
        return reply

    def _from_lua(self, value: object) -> Reply:
        """A script's return value as Redis would reply it (numbers truncated to integers, a
        table as the array of its items up to the first nil)."""
        if value is None or value is False:
            return None
        if value is True:
            return 1
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str):
            return value
        items: list[Reply] = []
        index = 1
        while (item := value[index]) is not None:  # type: ignore[index]
            items.append(self._from_lua(item))
            index += 1
        return items


def _arg(value: object) -> str:
    """An argument as Redis receives it: a string (numbers without a needless fraction)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


class MemoryStore:
    def __init__(
        self,
        *,
        clock_us: Callable[[], int] | None = None,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.clock_us = clock_us
        self.retention_days = retention_days
        self.layout = Layout(prefix)
        self.keys = Keyspace()
        self._lua = _Lua(self.keys)

    def _now_us(self) -> int:
        return int(self.clock_us()) if self.clock_us is not None else system_clock_us()

    def _run(self, name: str, keys: Sequence[str], args: Sequence[object], now_us: int) -> Reply:
        return self._lua.run(name, keys, args, now_us // 1000)

    async def admit(self, admission: Admission) -> Decision:
        now_us = self._now_us()
        reply = self._run(scripts.ADMIT, self.layout.admit_keys(admission), admit_args(admission, now_us), now_us)
        return decode_decision(reply)

    async def peek(self, admission: Admission) -> Peek:
        now_us = self._now_us()
        reply = self._run(scripts.ADMIT, self.layout.admit_keys(admission), peek_args(admission, now_us), now_us)
        return decode_peek(reply, admission.windows)

    async def settle(self, settlement: Settlement) -> Settled:
        now_us = self._now_us()
        args = settle_args(settlement, now_us, self.retention_days * 86_400)
        return decode_settled(self._run(scripts.SETTLE, self.layout.settle_keys(settlement), args, now_us))

    async def renew(self, renewal: Renewal) -> bool:
        now_us = self._now_us()
        reply = self._run(scripts.RENEW, self.layout.renew_keys(renewal), renew_args(renewal, now_us), now_us)
        return bool(reply)

    async def hold(self, upstream: str, model: str, kind: HoldKind, hold_ms: int) -> int:
        now_us = self._now_us()
        args = hold_args(upstream, model, kind, hold_ms, now_us)
        ends = self._run(scripts.HOLD, [self.layout.holds()], args, now_us)
        assert isinstance(ends, int)  # the script returns a number, as an integer reply
        return ends

    async def holds(self) -> SharedHolds:
        now_us = self._now_us()
        return decode_held(self._run(scripts.HELD, [self.layout.holds()], held_args(now_us), now_us))

    def seed_spent(self, team: str, scope: ScopeLimits, day: str, spent_micros: int) -> None:
        """Start a scope's budget day from at least `spent_micros` (what Redis last said was
        committed, divided among the replicas), so an outage does not reset a budget to zero."""
        self._seed(self.layout.budget(team, scope, day), spent_micros, LATE_BUDGET_TTL_S * 1000)

    def seed_window_spent(self, team: str, window: WindowBudget, day: str, spent_micros: int) -> None:
        """Start a window budget, in the window containing `day`, from at least `spent_micros`
        (as `seed_spent`); kept at least as long as the window lasts."""
        ttl_ms = WINDOW_DAYS[window.window] * 86_400_000 + DAY_MARGIN_MS
        self._seed(self.layout.window_budget(team, window, day), spent_micros, ttl_ms)

    def _seed(self, name: str, spent_micros: int, ttl_ms: int) -> None:
        now_ms = self._now_us() // 1000
        spent = self.keys.call(now_ms, "HGET", name, "spent")
        if not isinstance(spent, str) or int(spent) < spent_micros:
            self.keys.call(now_ms, "HSET", name, "spent", str(spent_micros))
        if self.keys.pttl(name, now_ms) < ttl_ms:
            self.keys.call(now_ms, "PEXPIRE", name, str(ttl_ms))

    async def usage(self, day: str, teams: list[str]) -> dict[str, Any]:
        now_ms = self._now_us() // 1000
        ledgers = {t: {f: int(v) for f, v in self.keys.hash(self.layout.ledger(t, day), now_ms).items()} for t in teams}
        return usage_report(day, ledgers)

    async def budget_spent(
        self, day: str, teams_and_keys: Mapping[str, Iterable[str]]
    ) -> dict[tuple[ScopeKind, str], int]:
        now_ms, spent = self._now_us() // 1000, {}
        for team, keys in teams_and_keys.items():
            for s in [ScopeLimits("team", team), *(ScopeLimits("key", k) for k in keys)]:
                record = self.keys.hash(self.layout.budget(team, s, day), now_ms)
                spent[(s.kind, s.name)] = int(record.get("spent", 0))
        return spent

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
