"""The store in this process (one replica, no Redis): the same semantics as RedisStore.

`_admit`, `_settle` and `_renew` follow `lua/admit.lua`, `lua/settle.lua` and `lua/renew.lua` step by step over a small
keyspace with the same key names and expiries, so both stores give the same replies and ledger.
They never await, so each runs atomically on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

from . import bucket, layout
from .bucket import UNITS
from .layout import (
    decode_settled,
    DAY_MARGIN_MS, DEFAULT_PREFIX, DONE_TTL_S, LATE_BUDGET_TTL_S, NONE, PARALLEL_RETRY_MS, Layout,
    decode_decision, limit_args,
)
from .ledger import METRICS, SEP, usage_report
from .types import Admission, Decision, Renewal, ScopeKind, ScopeLimits, Settled, Settlement

SWEEP_EVERY = 1_000  # operations between sweeps of expired keys


class _Keyspace:
    """Named values (dicts) with expiry in the store's clock, dropped lazily and by sweeps."""

    def __init__(self) -> None:
        self._values: dict[str, dict] = {}
        self._expires: dict[str, int] = {}
        self._ops = 0

    def sweep(self, now_ms: int) -> None:
        self._ops += 1
        if self._ops % SWEEP_EVERY == 0:
            for name in [n for n, at in self._expires.items() if at <= now_ms]:
                self.delete(name)

    def get(self, name: str, now_ms: int) -> dict | None:
        at = self._expires.get(name)
        if at is not None and at <= now_ms:
            self.delete(name)
        return self._values.get(name)

    def put(self, name: str, now_ms: int) -> dict:
        value = self.get(name, now_ms)
        if value is None:
            value = self._values[name] = {}
        return value

    def delete(self, name: str) -> None:
        self._values.pop(name, None)
        self._expires.pop(name, None)

    def pttl(self, name: str, now_ms: int) -> int:
        if self.get(name, now_ms) is None:
            return -2
        at = self._expires.get(name)
        return -1 if at is None else at - now_ms

    def pexpire(self, name: str, ms: int, now_ms: int) -> None:
        if self.get(name, now_ms) is not None:
            self._expires[name] = now_ms + ms

    def extend_ttl(self, name: str, ms: int, now_ms: int) -> None:
        if self.pttl(name, now_ms) < ms:
            self.pexpire(name, ms, now_ms)

    def drop_empty(self, name: str) -> None:
        if name in self._values and not self._values[name]:
            self.delete(name)


class MemoryStore:
    def __init__(
        self,
        *,
        clock_us: Callable[[], int] | None = None,
        retention_days: int = 35,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self.retention_days = retention_days
        self.layout = Layout(prefix)
        self.keys = _Keyspace()

    def _now_ms(self) -> int:
        now_ms = int(self.clock_us()) // 1000
        self.keys.sweep(now_ms)
        return now_ms

    async def admit(self, admission: Admission) -> Decision:
        return decode_decision(self._admit(admission, self._now_ms()))

    async def settle(self, settlement: Settlement) -> Settled:
        return decode_settled(self._settle(settlement, self._now_ms()))

    async def renew(self, renewal: Renewal) -> bool:
        return self._renew(renewal, self._now_ms())

    async def usage(self, day: str, teams: list[str]) -> dict:
        now_ms = self._now_ms()
        ledgers = {t: dict(self.keys.get(self.layout.ledger(t, day), now_ms) or {}) for t in teams}
        return usage_report(day, ledgers)

    async def budget_spent(
        self, day: str, teams_and_keys: Mapping[str, Iterable[str]]
    ) -> dict[tuple[ScopeKind, str], int]:
        now_ms, spent = self._now_ms(), {}
        for team, keys in teams_and_keys.items():
            for s in [ScopeLimits("team", team), *(ScopeLimits("key", k) for k in keys)]:
                record = self.keys.get(self.layout.budget(team, s, day), now_ms) or {}
                spent[(s.kind, s.name)] = record.get("spent", 0)
        return spent

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def seed_spent(self, team: str, scope: ScopeLimits, day: str, spent_micros: int) -> None:
        """Start a scope's budget day from at least `spent_micros` (what Redis last said was
        committed, divided among the replicas), so an outage does not reset a budget to zero."""
        now_ms = self._now_ms()
        name = self.layout.budget(team, scope, day)
        record = self.keys.put(name, now_ms)
        record["spent"] = max(record.get("spent", 0), spent_micros)
        self.keys.extend_ttl(name, LATE_BUDGET_TTL_S * 1000, now_ms)

    # -- bucket and lease helpers, as in the Lua ------------------------------------------------

    def _read_bucket(self, name: str, rate: int, capacity: int, now_ms: int) -> int:
        record = self.keys.get(name, now_ms) or {}
        return bucket.refill(record.get("l"), record.get("t"), now_ms, rate, capacity)

    def _write_bucket(self, name: str, level: int, rate: int, capacity: int, now_ms: int) -> None:
        self.keys.put(name, now_ms).update(l=level, t=now_ms)
        self.keys.pexpire(name, bucket.reset_ms(level, rate, capacity) + bucket.TTL_MARGIN_MS, now_ms)

    def _purge_leases(self, name: str, now_ms: int) -> list[str]:
        leases = self.keys.get(name, now_ms) or {}
        expired = [i for i, at in leases.items() if at <= now_ms]
        for i in expired:
            del leases[i]
        self.keys.drop_empty(name)
        return expired

    def _purge_holds(self, budget: str, leases: str, now_ms: int) -> None:
        for i in self._purge_leases(leases, now_ms):
            self._release_hold(budget, i, now_ms)

    def _release_hold(self, budget: str, request_id: str, now_ms: int) -> None:
        record = self.keys.get(budget, now_ms)
        if record is not None and f"h:{request_id}" in record:
            record["held"] = record.get("held", 0) - record.pop(f"h:{request_id}")

    def _add_lease(self, name: str, request_id: str, expires: int, ttl_ms: int, now_ms: int) -> None:
        self.keys.put(name, now_ms)[request_id] = expires
        self.keys.extend_ttl(name, ttl_ms, now_ms)

    # -- admit -----------------------------------------------------------------------------------

    def _admit(self, a: Admission, now_ms: int) -> list:
        keys = self.layout.admit_keys(a)
        labels, starts = a.days.labels, a.days.starts
        day = 0
        for i, start in enumerate(starts[: len(labels)]):
            if now_ms >= start * 1000:
                day = i
        day_left_ms = max(0, starts[day + 1] * 1000 - now_ms)
        scopes = []
        for kind, offset, limits in (("key", 0, a.key), ("team", 3, a.team)):
            rpm, rq_cap, tpm, tk_cap, max_par, budget = limit_args(limits)
            sc = dict(kind=kind, rq=keys[offset], tk=keys[offset + 1], par=keys[offset + 2],
                      b=keys[7 + 4 * day + (2 if kind == "team" else 0)],
                      rpm=rpm, rq_cap=rq_cap, tpm=tpm, tk_cap=tk_cap, max_par=max_par, budget=budget)
            sc["bl"] = sc["b"] + ":leases"
            if rpm >= 0:
                sc["rq_level"] = self._read_bucket(sc["rq"], rpm, rq_cap, now_ms)
            if tpm >= 0:
                sc["tk_level"] = self._read_bucket(sc["tk"], tpm, tk_cap, now_ms)
            if max_par >= 0:
                self._purge_leases(sc["par"], now_ms)
                sc["in_flight"] = len(self.keys.get(sc["par"], now_ms) or {})
            if budget >= 0:
                self._purge_holds(sc["b"], sc["bl"], now_ms)
                record = self.keys.get(sc["b"], now_ms) or {}
                sc["committed"] = record.get("spent", 0) + record.get("held", 0)
            scopes.append(sc)

        # refusal priority: budget, then a request that can never fit, then the longest wait
        reason, scope, retry, never = None, None, 0, 0
        for sc in scopes:
            if reason is None and sc["budget"] >= 0 and sc["committed"] + a.cost_micros > sc["budget"]:
                reason, scope, retry = "budget", sc, day_left_ms
                if a.cost_micros > sc["budget"]:
                    never = 1
        for sc in scopes:
            if reason is None and sc["tpm"] >= 0 and a.tokens > sc["tk_cap"]:
                reason, scope, never = "tpm", sc, 1
        if reason is None:
            for sc in scopes:
                waits = []
                if sc["rpm"] >= 0:
                    waits.append(("rpm", bucket.wait_ms(sc["rq_level"], 1, sc["rpm"])))
                if sc["tpm"] >= 0:
                    waits.append(("tpm", bucket.wait_ms(sc["tk_level"], a.tokens, sc["tpm"])))
                if sc["max_par"] >= 0 and sc["in_flight"] >= sc["max_par"]:
                    waits.append(("parallel", PARALLEL_RETRY_MS))
                for name, wait in waits:
                    if wait > retry:
                        reason, scope, retry = name, sc, wait

        if reason is None:
            expires = now_ms + a.lease_ttl_ms
            for sc in scopes:
                if sc["rpm"] >= 0:
                    sc["rq_level"] -= UNITS
                    self._write_bucket(sc["rq"], sc["rq_level"], sc["rpm"], sc["rq_cap"], now_ms)
                if sc["tpm"] >= 0:
                    sc["tk_level"] -= a.tokens * UNITS
                    self._write_bucket(sc["tk"], sc["tk_level"], sc["tpm"], sc["tk_cap"], now_ms)
                if sc["max_par"] >= 0:
                    self._add_lease(sc["par"], a.request_id, expires,
                                    a.lease_ttl_ms + bucket.TTL_MARGIN_MS, now_ms)
                if sc["budget"] >= 0:
                    record = self.keys.put(sc["b"], now_ms)
                    record["held"] = record.get("held", 0) + a.cost_micros
                    record[f"h:{a.request_id}"] = a.cost_micros
                    self._add_lease(sc["bl"], a.request_id, expires, day_left_ms + DAY_MARGIN_MS, now_ms)
                    sc["committed"] += a.cost_micros
                    self.keys.extend_ttl(sc["b"], day_left_ms + DAY_MARGIN_MS, now_ms)
            self.keys.put(keys[6], now_ms).update(
                tokens=a.tokens, cost=a.cost_micros, day=labels[day], exp=expires,
                kt=scopes[0]["tpm"] >= 0, tt=scopes[1]["tpm"] >= 0)
            self.keys.pexpire(keys[6], a.lease_ttl_ms + bucket.TTL_MARGIN_MS, now_ms)

        # the tightest bucket of each kind (lowest remaining, then longest reset) and budget scope
        def tighter(best, capacity, level, rate):
            left, reset = bucket.remaining(level), bucket.reset_ms(level, rate, capacity)
            if best is None or left < best[1] or (left == best[1] and reset > best[2]):
                return [capacity, left, reset]
            return best

        rq = tk = budget = None
        for sc in scopes:
            if sc["rpm"] >= 0:
                rq = tighter(rq, sc["rq_cap"], sc["rq_level"], sc["rpm"])
            if sc["tpm"] >= 0:
                tk = tighter(tk, sc["tk_cap"], sc["tk_level"], sc["tpm"])
            if sc["budget"] >= 0 and (budget is None or sc["budget"] - sc["committed"] < budget[1] - budget[0]):
                budget = [sc["committed"], sc["budget"]]
        if reason == "budget":
            budget = [scope["committed"], scope["budget"]]
        rq, tk, budget = rq or [NONE, 0, 0], tk or [NONE, 0, 0], budget or [0, 0]
        admitted, reason_s, scope_s = (1, "", "") if reason is None else (0, reason, scope["kind"])
        seen = [sc["committed"] if sc["budget"] >= 0 else NONE for sc in scopes]
        return [admitted, reason_s, scope_s, retry, never, *rq, *tk, *budget, labels[day],
                math.ceil(day_left_ms / 1000), *seen]

    # -- renew -----------------------------------------------------------------------------------

    def _renew(self, r: Renewal, now_ms: int) -> bool:
        record_key, *lease_keys = self.layout.renew_keys(r)
        record = self.keys.get(record_key, now_ms)
        if record is None or record["exp"] <= now_ms:
            return False
        expires = record["exp"] = now_ms + r.lease_ttl_ms
        self.keys.pexpire(record_key, r.lease_ttl_ms + bucket.TTL_MARGIN_MS, now_ms)
        for name in lease_keys:
            leases = self.keys.get(name, now_ms)
            if leases is not None and r.request_id in leases:
                leases[r.request_id] = expires
                self.keys.extend_ttl(name, r.lease_ttl_ms + bucket.TTL_MARGIN_MS, now_ms)
        return True

    # -- settle ----------------------------------------------------------------------------------

    def _refund(self, name: str, amount: int, rate: int, capacity: int, now_ms: int) -> None:
        level = bucket.credit(self._read_bucket(name, rate, capacity, now_ms), amount, capacity)
        self._write_bucket(name, level, rate, capacity, now_ms)

    def _settle(self, s: Settlement, now_ms: int) -> list | int:
        done, record_key, key_tk, team_tk, key_par, team_par, kb, kbl, tb, tbl, ledger = (
            self.layout.settle_keys(s))
        if self.keys.get(done, now_ms) is not None:
            return 0
        self.keys.put(done, now_ms)["done"] = 1
        self.keys.pexpire(done, DONE_TTL_S * 1000, now_ms)

        record = self.keys.get(record_key, now_ms)
        if record is not None and record["exp"] > now_ms:
            diff = record["tokens"] - s.usage.prompt_tokens - s.usage.completion_tokens
            _, _, key_tpm, key_cap, _, _ = limit_args(s.key)
            _, _, team_tpm, team_cap, _, _ = limit_args(s.team)
            if record["kt"] and key_tpm >= 0:
                self._refund(key_tk, diff, key_tpm, key_cap, now_ms)
            if record["tt"] and team_tpm >= 0:
                self._refund(team_tk, diff, team_tpm, team_cap, now_ms)
            for par in (key_par, team_par):
                (self.keys.get(par, now_ms) or {}).pop(s.request_id, None)
                self.keys.drop_empty(par)
            for budget, leases in ((kb, kbl), (tb, tbl)):
                self._release_hold(budget, s.request_id, now_ms)
                (self.keys.get(leases, now_ms) or {}).pop(s.request_id, None)
                self.keys.drop_empty(leases)
        self.keys.delete(record_key)

        reply = [1, 0, 0, 0, 0]
        for i, (budget, alert) in enumerate(((kb, s.key.alert_micros), (tb, s.team.alert_micros)), start=1):
            record = self.keys.put(budget, now_ms)
            record["spent"] = record.get("spent", 0) + s.cost_micros
            if self.keys.pttl(budget, now_ms) < 0:
                self.keys.pexpire(budget, LATE_BUDGET_TTL_S * 1000, now_ms)
            reply[i] = record["spent"]
            if alert is not None and record["spent"] >= alert and "alerted" not in record:
                record["alerted"] = 1
                reply[2 + i] = 1

        values = (s.cost_micros, 1, s.usage.prompt_tokens, s.usage.completion_tokens,
                  s.usage.cached_tokens)
        fields = self.keys.put(ledger, now_ms)
        tags_fit = len(fields) < layout.LEDGER_MAX_FIELDS
        tags = [f"tag{SEP}{k}={v}" for k, v in s.tags]
        tags = [t if tags_fit or f"{t}{SEP}requests" in fields else f"tag{SEP}{layout.OVERFLOW_TAG}" for t in tags]
        prefixes = ["team", f"key{SEP}{s.key.name}", f"model{SEP}{s.key.name}{SEP}{s.model}", *tags]
        for prefix in prefixes:
            for metric, value in zip(METRICS, values):
                fields[f"{prefix}{SEP}{metric}"] = fields.get(f"{prefix}{SEP}{metric}", 0) + value
        self.keys.pexpire(ledger, self.retention_days * 86_400_000, now_ms)
        return reply
