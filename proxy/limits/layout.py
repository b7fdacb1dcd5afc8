"""Where each counter lives, and the argument and reply layout of the scripts.

Every key of a team and its keys shares the hash tag `{<team>}`, so one admit or settle touches
one Redis Cluster slot:

    llmrl:{T}:t:rq | llmrl:{T}:k:<key>:rq       request bucket   hash l (level, units), t (ms)
    llmrl:{T}:t:tk | llmrl:{T}:k:<key>:tk       token bucket     hash l, t
    llmrl:{T}:t:par | llmrl:{T}:k:<key>:par     parallel leases  zset request id -> expiry ms
    llmrl:{T}:t:b:<day> | ...k:<key>:b:<day>    budget day       hash spent, held, h:<id> -> micros
    ...:b:<day>:leases                          budget holds     zset request id -> expiry ms
    llmrl:{T}:r:<request id>                    reservation      hash tokens, cost, day, exp, kt, tt
    llmrl:{T}:d:<request id>                    settled marker   string (settled or abandoned:
                                                                 a later admit of the id is a no-op)
    llmrl:{T}:ledger:<day>                      spend ledger     hash, see proxy.limits.ledger

MemoryStore keeps the same names in its own keyspace, and returns the same reply array.
"""

from __future__ import annotations

from collections.abc import Sequence

from .types import (
    Admission,
    BucketState,
    Decision,
    Renewal,
    ScopeLimits,
    Settled,
    Settlement,
)

DEFAULT_PREFIX = "llmrl"
DAY_MARGIN_MS = 2 * 86_400_000  # a budget day's records outlive the day by this much
# A settled request id is remembered this long, so a journal flush that is retried after a lost
# reply never counts twice. One key per request: 15 minutes of traffic, not days of it (at a steady
# 100 req/s about 90k keys, ~12 MB). A retry later than this (an outage longer than 15 minutes that
# began by losing a reply whose settlement Redis had applied) could count that one request twice.
DONE_TTL_S = 15 * 60
LATE_BUDGET_TTL_S = 3 * 86_400  # a budget day record first created by a late settlement
NONE = -1  # "no such limit" in script arguments and replies
LEDGER_MAX_FIELDS = 20_000  # a team-day's ledger books new tags as other=overflow past this (~4k tags)
OVERFLOW_TAG = "other=overflow"


class Layout:
    """The key names of one deployment (`prefix`)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def team(self, team: str) -> str:
        return f"{self.prefix}:{{{team}}}"

    def scope(self, team: str, s: ScopeLimits) -> str:
        return f"{self.team(team)}:t" if s.kind == "team" else f"{self.team(team)}:k:{s.name}"

    def budget(self, team: str, s: ScopeLimits, day: str) -> str:
        return f"{self.scope(team, s)}:b:{day}"

    def ledger(self, team: str, day: str) -> str:
        return f"{self.team(team)}:ledger:{day}"

    def admit_keys(self, a: Admission) -> list[str]:
        t = a.team.name
        key, team = self.scope(t, a.key), self.scope(t, a.team)
        keys = [f"{key}:rq", f"{key}:tk", f"{key}:par", f"{team}:rq", f"{team}:tk", f"{team}:par",
                f"{self.team(t)}:r:{a.request_id}"]
        for day in a.days.labels:
            kb, tb = self.budget(t, a.key, day), self.budget(t, a.team, day)
            keys += [kb, f"{kb}:leases", tb, f"{tb}:leases"]
        keys.append(f"{self.team(t)}:d:{a.request_id}")  # last: the settled marker
        return keys

    def settle_keys(self, s: Settlement) -> list[str]:
        t = s.team.name
        key, team = self.scope(t, s.key), self.scope(t, s.team)
        kb, tb = self.budget(t, s.key, s.day), self.budget(t, s.team, s.day)
        return [f"{self.team(t)}:d:{s.request_id}", f"{self.team(t)}:r:{s.request_id}",
                f"{key}:tk", f"{team}:tk", f"{key}:par", f"{team}:par",
                kb, f"{kb}:leases", tb, f"{tb}:leases", self.ledger(t, s.day)]

    def renew_keys(self, r: Renewal) -> list[str]:
        t = r.team.name
        kb, tb = self.budget(t, r.key, r.day), self.budget(t, r.team, r.day)
        return [f"{self.team(t)}:r:{r.request_id}", f"{self.scope(t, r.key)}:par",
                f"{self.scope(t, r.team)}:par", f"{kb}:leases", f"{tb}:leases"]


def limit_args(s: ScopeLimits) -> list[int]:
    """rpm, request capacity, tpm, token capacity, max parallel, budget; NONE where unlimited."""
    rq = [s.rpm, s.request_capacity] if s.rpm and s.request_capacity else [NONE, NONE]
    tk = [s.tpm, s.token_capacity] if s.tpm and s.token_capacity else [NONE, NONE]
    par = NONE if s.max_parallel is None else s.max_parallel
    budget = NONE if s.budget_micros is None else s.budget_micros
    return [*rq, *tk, par, budget]


def admit_args(a: Admission, now_us: int | None) -> list:
    if len(a.days.starts) != len(a.days.labels) + 1 or not a.days.labels:
        raise ValueError("BudgetDay needs one more start than labels, and at least one label")
    return ["" if now_us is None else now_us, a.request_id, a.tokens, a.cost_micros,
            a.lease_ttl_ms, DAY_MARGIN_MS, *limit_args(a.key), *limit_args(a.team),
            len(a.days.labels), *a.days.labels, *a.days.starts]


def settle_args(s: Settlement, now_us: int | None, ledger_ttl_s: int) -> list:
    key, team = limit_args(s.key), limit_args(s.team)
    return ["" if now_us is None else now_us, s.request_id, DONE_TTL_S, ledger_ttl_s,
            LATE_BUDGET_TTL_S, key[2], key[3], team[2], team[3], s.cost_micros,
            s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.cached_tokens,
            s.key.name, s.model, _or_none(s.key.alert_micros), _or_none(s.team.alert_micros),
            LEDGER_MAX_FIELDS, 1 if s.abandoned else 0, *(f"{k}={v}" for k, v in s.tags)]


def renew_args(r: Renewal, now_us: int | None) -> list:
    return ["" if now_us is None else now_us, r.request_id, r.lease_ttl_ms]


def _or_none(value: int | None) -> int:
    return NONE if value is None else value


def decode_settled(reply) -> Settled:
    """The settle reply: 0 for a duplicate, else [1, key spent, team spent, key crossed, team crossed]."""
    if not isinstance(reply, (list, tuple)):
        return Settled(False)
    applied, key_spent, team_spent, key_crossed, team_crossed = (int(x) for x in reply)
    return Settled(bool(applied), key_spent, team_spent, bool(key_crossed), bool(team_crossed))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bucket(limit, left, reset) -> BucketState | None:
    return None if int(limit) == NONE else BucketState(int(limit), int(left), int(reset))


STALE = Decision(admitted=False, stale=True)


def decode_decision(reply: Sequence | int) -> Decision:
    """The admit reply: 0 when the request id was already settled or abandoned (nothing changed),
    else [admitted, reason, scope, retry_after_ms, never_fits, request limit, remaining, reset_ms,
    token limit, remaining, reset_ms, budget committed, budget limit, day, day_reset_s, key
    committed, team committed]."""
    if not isinstance(reply, (list, tuple)):
        return STALE
    admitted, reason, scope, retry, never, *rest = reply
    rq, tk = rest[0:3], rest[3:6]
    spent, limit, day, day_reset, key_committed, team_committed = rest[6:12]
    return Decision(
        admitted=bool(int(admitted)),
        reason=_text(reason) or None,
        scope=_text(scope) or None,
        retry_after_ms=int(retry),
        never_fits=bool(int(never)),
        requests=_bucket(*rq),
        tokens=_bucket(*tk),
        budget_spent_micros=int(spent),
        budget_limit_micros=int(limit),
        day=_text(day),
        day_reset_s=int(day_reset),
        key_committed_micros=int(key_committed),
        team_committed_micros=int(team_committed),
    )
