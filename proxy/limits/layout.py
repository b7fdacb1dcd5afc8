"""Where each counter lives, and the argument and reply layout of the scripts.

Every key of a team and its keys shares the hash tag `{<team>}`, so one admit or settle touches
one Redis Cluster slot:

    llmrl:{T}:t:rq | llmrl:{T}:k:<key>:rq       request bucket   hash l (level, units), t (ms)
    llmrl:{T}:t:tk | llmrl:{T}:k:<key>:tk       token bucket     hash l, t
    llmrl:{T}:t:par | llmrl:{T}:k:<key>:par     parallel leases  zset request id -> expiry ms
    llmrl:{T}:t:b:<day> | ...k:<key>:b:<day>    budget day       hash spent, held, h:<id> -> micros
    ...:b:<day>:leases                          budget holds     zset request id -> expiry ms
    llmrl:{T}:x:<credential id>                 revocation fence string ms from which it is refused
    llmrl:{T}:r:<request id>                    reservation      hash tokens, cost, day, exp, kt, tt
    llmrl:{T}:d:<request id>                    settled marker   string (settled or abandoned:
                                                                 a later admit of the id is a no-op)
    llmrl:{T}:ledger:<day>                      spend ledger     hash, see proxy.limits.ledger
    llmrl:{T}:t:w:<label> | ...k:<key>:w:<label> a window budget  hash and :leases as a budget day;
    llmrl:{T}:u:<end user>:w:<label>             label "2026-12-01", "2026-W49" or "2026-12"
    llmrl:{T}:u:<end user>:rq|tk|par            an end user's buckets and leases (end_users.limits)
    llmrl:{org}:w:<label>                        the org's: outside every team's slot (see README)
    llmrl:{quota}:u:<upstream>:rq|tk|par         an upstream account's quota (upstreams.NAME.limits)
    llmrl:{quota}:u:<upstream>:m:<model>:rq|...  a deployment's (a target's limits): outside every
                                                 team's slot too
    llmrl:{quota}:u:<upstream>[:m:<model>]:fair  its fair shares   hash V (virtual clock), v:<team>
                                                 (virtual time), w:<team> (wants it until, ms)
    llmrl:{holds}                                held targets  hash <upstream> TAB <model> ->
                                                 "<end ms> <kind>" (hold.lua, held.lua)

MemoryStore keeps the same names in its own keyspace, and returns the same reply array.

Each script's ARGV and KEYS are named once, here. ARGV: `ADMIT_ARGS`, `SETTLE_ARGS`,
`RENEW_ARGS`, `HOLD_ARGS`, `HELD_ARGS`, from which the `*_args` functions build it. KEYS: the fixed keys (`ADMIT_KEYS`,
`SETTLE_KEYS`, `RENEW_KEYS`) first, then the variable sections, each a group of named keys
repeated per candidate day (`ADMIT_DAY_KEYS`), per window budget (`*_WINDOW_KEYS`) or per
upstream quota scope (`*_QUOTA_KEYS`, with its arguments `*_QUOTA_ARGS`), from which the `*_keys`
methods build it. Each script reads both into named fields in the same order (its
`ARG_NAMES`, `KEY_NAMES`, `DAY_KEY_NAMES`, `WINDOW_KEY_NAMES`, `QUOTA_KEY_NAMES` and
`QUOTA_ARG_NAMES` tables, checked against these by tests/test_layout.py), and reaches a variable
section only through its small helpers (`day_budgets(d)`, `window_budget(w, d)`, `quota_scope(q)`).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, cast

from ..budgets.windows import label_of_day
from .types import (
    WINDOW_DAYS,
    Admission,
    BucketState,
    BudgetState,
    Candidates,
    Decision,
    HoldKind,
    Peek,
    QuotaLeft,
    QuotaLimits,
    Reason,
    RefusingScope,
    Renewal,
    ScopeLimits,
    ScopeState,
    Settled,
    Settlement,
    SharedHolds,
    TargetHold,
    WindowBudget,
)

DEFAULT_PREFIX = "llmrl"
DAY_MARGIN_MS = 2 * 86_400_000  # a budget day's records outlive the day by this much
# A settled request id is remembered this long, so a journal flush that is retried after a lost
# reply never counts twice. One key per request: 15 minutes of traffic, not days of it (at a steady
# 100 req/s about 90k keys, ~12 MB). A retry later than this (an outage longer than 15 minutes that
# began by losing a reply whose settlement Redis had applied) could count that one request twice.
DONE_TTL_S = 15 * 60
LATE_BUDGET_TTL_S = 3 * 86_400  # a budget day record first created by a late settlement
UNLIMITED = -1  # a limit the scope does not have, in script arguments and replies (`UNLIMITED` in the Lua)
LEDGER_MAX_FIELDS = 20_000  # a team-day's ledger books new tags as other=overflow past this (~2.8k tags of 7 fields)


class Layout:
    """The key names of one deployment (`prefix`)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def team(self, team: str) -> str:
        return f"{self.prefix}:{{{team}}}"

    def scope(self, team: str, s: ScopeLimits) -> str:
        if s.kind == "end_user":
            return f"{self.team(team)}:u:{s.name}"
        return f"{self.team(team)}:t" if s.kind == "team" else f"{self.team(team)}:k:{s.name}"

    def budget(self, team: str, s: ScopeLimits, day: str) -> str:
        return f"{self.scope(team, s)}:b:{day}"

    def window_budget(self, team: str, w: WindowBudget, day: str) -> str:
        """The budget hash of `w` in the window containing `day`."""
        label = label_of_day(w.window, day)
        if w.scope == "org":
            return f"{self.prefix}:{{org}}:w:{label}"
        if w.scope == "team":
            return f"{self.team(team)}:t:w:{label}"
        kind = "k" if w.scope == "key" else "u"
        return f"{self.team(team)}:{kind}:{w.name}:w:{label}"

    def _day_budgets(self, team: str, key: ScopeLimits, team_scope: ScopeLimits, day: str) -> dict[str, str]:
        """The key's and the team's budget of `day` with their holds, by their `ADMIT_DAY_KEYS` names."""
        kb, tb = self.budget(team, key, day), self.budget(team, team_scope, day)
        return {
            "key_budget": kb,
            "key_budget_holds": f"{kb}:leases",
            "team_budget": tb,
            "team_budget_holds": f"{tb}:leases",
        }

    def _window_keys(
        self, team: str, windows: tuple[WindowBudget, ...], days: tuple[str, ...], names: tuple[str, ...]
    ) -> list[str]:
        """For each window budget, for each day, its window's keys named by `names` (of "budget", "holds")."""
        keys: list[str] = []
        for w in windows:
            for day in days:
                budget = self.window_budget(team, w, day)
                named = {"budget": budget, "holds": f"{budget}:leases"}
                keys += [named[name] for name in names]
        return keys

    def quota(self, q: QuotaLimits) -> str:
        """An upstream quota scope: shared by every team, so outside every team's slot."""
        account = f"{self.prefix}:{{quota}}:u:{q.upstream}"
        return f"{account}:m:{q.model}" if q.model else account

    def _quota_keys(self, candidates: Candidates, names: tuple[str, ...], only_parallel: bool = False) -> list[str]:
        """For each quota scope of each candidate, its keys named by `names` (of "requests",
        "tokens", "parallel"); `only_parallel`: only the scopes with a max_parallel."""
        keys: list[str] = []
        for scopes in candidates:
            for q in scopes:
                if only_parallel and q.max_parallel is None:
                    continue
                base = self.quota(q)
                named = {
                    "requests": f"{base}:rq",
                    "tokens": f"{base}:tk",
                    "parallel": f"{base}:par",
                    "fair": f"{base}:fair",
                }
                keys += [named[name] for name in names]
        return keys

    def holds(self) -> str:
        """The targets their providers said are out of capacity, shared by every replica: one hash
        in one slot of its own (`hold.lua` writes it, `held.lua` reads it)."""
        return f"{self.prefix}:{{holds}}"

    def ledger(self, team: str, day: str) -> str:
        return f"{self.team(team)}:ledger:{day}"

    def fence(self, team: str, credential_id: str | None) -> str:
        """A runtime credential's revocation fence (proxy.registry.layout); config keys name one
        that is never written."""
        return f"{self.team(team)}:x:{credential_id or '-'}"

    def admit_keys(self, a: Admission) -> list[str]:
        t = a.team.name
        key, team, user = self.scope(t, a.key), self.scope(t, a.team), self.scope(t, a.user)
        named = {
            "key_requests": f"{key}:rq",
            "key_tokens": f"{key}:tk",
            "key_parallel": f"{key}:par",
            "team_requests": f"{team}:rq",
            "team_tokens": f"{team}:tk",
            "team_parallel": f"{team}:par",
            "user_requests": f"{user}:rq",
            "user_tokens": f"{user}:tk",
            "user_parallel": f"{user}:par",
            "reservation": f"{self.team(t)}:r:{a.request_id}",
            "fence": self.fence(t, a.credential_id),
            "settled_marker": f"{self.team(t)}:d:{a.request_id}",
        }
        keys = list(_IN_ADMIT_ORDER(named))
        for day in a.days.labels:
            keys += _IN_DAY_ORDER(self._day_budgets(t, a.key, a.team, day))
        keys += self._window_keys(t, a.windows, a.days.labels, ADMIT_WINDOW_KEYS)
        if a.quotas:
            keys += self._quota_keys(a.quotas, ADMIT_QUOTA_KEYS)
        return keys

    def settle_keys(self, s: Settlement) -> list[str]:
        t = s.team.name
        key, team, user = self.scope(t, s.key), self.scope(t, s.team), self.scope(t, s.user)
        named = {
            "settled_marker": f"{self.team(t)}:d:{s.request_id}",
            "reservation": f"{self.team(t)}:r:{s.request_id}",
            "key_tokens": f"{key}:tk",
            "team_tokens": f"{team}:tk",
            "user_tokens": f"{user}:tk",
            "key_parallel": f"{key}:par",
            "team_parallel": f"{team}:par",
            "user_parallel": f"{user}:par",
            **self._day_budgets(t, s.key, s.team, s.day),
            "ledger": self.ledger(t, s.day),
        }
        keys = list(_IN_SETTLE_ORDER(named))
        keys += self._window_keys(t, s.windows, (s.day,), SETTLE_WINDOW_KEYS)
        if s.quotas:
            keys += self._quota_keys(s.quotas, SETTLE_QUOTA_KEYS)
        return keys

    def renew_keys(self, r: Renewal) -> list[str]:
        t = r.team.name
        named = {
            "reservation": f"{self.team(t)}:r:{r.request_id}",
            "key_parallel": f"{self.scope(t, r.key)}:par",
            "team_parallel": f"{self.scope(t, r.team)}:par",
            "user_parallel": f"{self.scope(t, r.user)}:par",
            **self._day_budgets(t, r.key, r.team, r.day),
        }
        keys = list(_IN_RENEW_ORDER(named))
        keys += self._window_keys(t, r.windows, (r.day,), RENEW_WINDOW_KEYS)
        if r.quotas:
            keys += self._quota_keys(r.quotas, RENEW_QUOTA_KEYS, only_parallel=True)
        return keys


# Each script's KEYS: its fixed keys by name, then its variable sections, each a repeated group of
# named keys. The scripts read them by these names (their KEY_NAMES, DAY_KEY_NAMES and
# WINDOW_KEY_NAMES tables, checked against these by tests/test_layout.py).
# admit.lua: these; then ADMIT_DAY_KEYS for each candidate day (`day_count`, in order); then
# ADMIT_WINDOW_KEYS for each window budget (in order) and, within it, each candidate day (the
# budget of its window containing that day); then ADMIT_QUOTA_KEYS for each upstream quota scope
# (`quota_count`: each candidate's scopes, candidate after candidate)
ADMIT_KEYS = (
    "key_requests",
    "key_tokens",
    "key_parallel",
    "team_requests",
    "team_tokens",
    "team_parallel",
    "user_requests",
    "user_tokens",
    "user_parallel",
    "reservation",
    "fence",  # the caller's revocation fence
    "settled_marker",
)
ADMIT_DAY_KEYS = ("key_budget", "key_budget_holds", "team_budget", "team_budget_holds")
ADMIT_WINDOW_KEYS = ("budget", "holds")
ADMIT_QUOTA_KEYS = ("requests", "tokens", "parallel", "fair")
# settle.lua: these (the budgets and ledger of the request's day); then SETTLE_WINDOW_KEYS for
# each window budget (its window containing the request's day); then SETTLE_QUOTA_KEYS for each
# upstream quota scope
SETTLE_KEYS = (
    "settled_marker",
    "reservation",
    "key_tokens",
    "team_tokens",
    "user_tokens",
    "key_parallel",
    "team_parallel",
    "user_parallel",
    *ADMIT_DAY_KEYS,
    "ledger",
)
SETTLE_WINDOW_KEYS = ("budget", "holds")
SETTLE_QUOTA_KEYS = ("tokens", "parallel")
# renew.lua: these (the holds of the request's day); then RENEW_WINDOW_KEYS for each window budget;
# then RENEW_QUOTA_KEYS for each upstream quota scope with a max_parallel (`quota_count` of them)
RENEW_KEYS = ("reservation", "key_parallel", "team_parallel", "user_parallel", "key_budget_holds", "team_budget_holds")
RENEW_WINDOW_KEYS = ("holds",)
RENEW_QUOTA_KEYS = ("parallel",)
# a dict of keys by name to the tuple of its values in a script's order, at C speed (the hot path)
_IN_ADMIT_ORDER, _IN_DAY_ORDER = itemgetter(*ADMIT_KEYS), itemgetter(*ADMIT_DAY_KEYS)
_IN_SETTLE_ORDER, _IN_RENEW_ORDER = itemgetter(*SETTLE_KEYS), itemgetter(*RENEW_KEYS)

LIMIT_ARGS = ("rpm", "request_capacity", "tpm", "token_capacity", "max_parallel", "budget", "enforce")
# admit.lua's ARGV; after them, `day_count` day labels, then `day_count + 1` day starts (epoch s),
# then each window budget's three, then ADMIT_QUOTA_ARGS for each of the `quota_count` upstream
# quota scopes (`candidate`: the 1-based candidate it belongs to, of `candidate_count`)
ADMIT_ARGS = (
    "now_us",
    "request_id",
    "tokens",
    "cost",
    "lease_ttl_ms",
    "day_margin_ms",
    *(f"key_{name}" for name in LIMIT_ARGS),
    *(f"team_{name}" for name in LIMIT_ARGS),
    *(f"user_{name}" for name in LIMIT_ARGS),
    "day_count",
    "window_count",
    "quota_count",
    "candidate_count",
    "dry_run",  # 1: a peek (`peek_args`), answered with what the admit would read, nothing written
    "team_name",  # the team's name and its share (`teams.NAME.share`): its turn at a contended upstream quota
    "share",
)
ADMIT_QUOTA_ARGS = ("candidate", "rpm", "tpm", "max_parallel")
# settle.lua's ARGV; after them, each window budget's alert thresholds, then SETTLE_QUOTA_ARGS for
# each of the `quota_count` upstream quota scopes, then the request's tags as `name=value`
SETTLE_ARGS = (
    "now_us",
    "request_id",
    "done_ttl_s",
    "ledger_ttl_s",
    "late_budget_ttl_s",
    "key_tpm",
    "key_token_capacity",
    "team_tpm",
    "team_token_capacity",
    "user_tpm",
    "user_token_capacity",
    "cost",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "key_name",
    "model",
    "key_alert",
    "team_alert",
    "ledger_max_fields",
    "abandon",
    "window_count",
    "end_user",
    "quota_count",
)
SETTLE_QUOTA_ARGS = ("candidate", "tpm")
RENEW_ARGS = ("now_us", "request_id", "lease_ttl_ms", "quota_count")  # renew.lua's ARGV
# hold.lua's and held.lua's KEYS and ARGV: `target` is `hold_field`'s "<upstream>\t<model>"
HOLD_KEYS = HELD_KEYS = ("holds",)
HOLD_ARGS = ("now_us", "target", "hold_ms", "kind")
HELD_ARGS = ("now_us",)

Arg = int | str
ScriptReply = Any  # what a script returns, as the driver decodes it: nested lists of int, bytes, str


# the scripts' arguments in their order, picked from a dict of them by name at C speed
_IN_ADMIT_ARGS_ORDER, _IN_SETTLE_ARGS_ORDER = itemgetter(*ADMIT_ARGS), itemgetter(*SETTLE_ARGS)


def _limits(prefix: str, s: ScopeLimits) -> dict[str, Arg]:
    """A scope's limits as script arguments (`LIMIT_ARGS` after `prefix`), UNLIMITED where it has none."""
    rpm, request_capacity = (s.rpm, s.request_capacity) if s.rpm and s.request_capacity else (UNLIMITED, UNLIMITED)
    tpm, token_capacity = (s.tpm, s.token_capacity) if s.tpm and s.token_capacity else (UNLIMITED, UNLIMITED)
    return {
        f"{prefix}rpm": rpm,
        f"{prefix}request_capacity": request_capacity,
        f"{prefix}tpm": tpm,
        f"{prefix}token_capacity": token_capacity,
        f"{prefix}max_parallel": UNLIMITED if s.max_parallel is None else s.max_parallel,
        f"{prefix}budget": UNLIMITED if s.budget_micros is None else s.budget_micros,
        f"{prefix}enforce": 1 if s.enforce else 0,
    }


def admit_args(a: Admission, now_us: int | None, dry_run: bool = False) -> list[Arg]:
    if len(a.days.starts) != len(a.days.labels) + 1 or not a.days.labels:
        raise ValueError("BudgetDay needs one more start than labels, and at least one label")
    named: dict[str, Arg] = {
        "now_us": "" if now_us is None else now_us,
        "request_id": a.request_id,
        "tokens": a.tokens,
        "cost": a.cost_micros,
        "lease_ttl_ms": a.lease_ttl_ms,
        "day_margin_ms": DAY_MARGIN_MS,
        **_limits("key_", a.key),
        **_limits("team_", a.team),
        **_limits("user_", a.user),
        "day_count": len(a.days.labels),
        "window_count": len(a.windows),
        "quota_count": sum(len(scopes) for scopes in a.quotas),
        "candidate_count": len(a.quotas),
        "dry_run": 1 if dry_run else 0,
        "team_name": a.team.name,
        "share": repr(a.share),
    }
    windows: list[Arg] = []
    for w in a.windows:
        windows += [w.micros, 1 if w.enforce else 0, (WINDOW_DAYS[w.window] - 1) * 86_400_000]
    quotas: list[Arg] = []
    for candidate, scopes in enumerate(a.quotas, 1):
        for q in scopes:
            quotas += [candidate, _or_unlimited(q.rpm), _or_unlimited(q.tpm), _or_unlimited(q.max_parallel)]
    return [*_IN_ADMIT_ARGS_ORDER(named), *a.days.labels, *a.days.starts, *windows, *quotas]


def peek_args(a: Admission, now_us: int | None) -> list[Arg]:
    """admit.lua's ARGV for a peek of `a` (`decode_peek` reads the reply)."""
    return admit_args(a, now_us, dry_run=True)


def settle_args(s: Settlement, now_us: int | None, ledger_ttl_s: int) -> list[Arg]:
    key, team, user = _limits("key_", s.key), _limits("team_", s.team), _limits("user_", s.user)
    named: dict[str, Arg] = {
        "now_us": "" if now_us is None else now_us,
        "request_id": s.request_id,
        "done_ttl_s": DONE_TTL_S,
        "ledger_ttl_s": ledger_ttl_s,
        "late_budget_ttl_s": LATE_BUDGET_TTL_S,
        "key_tpm": key["key_tpm"],
        "key_token_capacity": key["key_token_capacity"],
        "team_tpm": team["team_tpm"],
        "team_token_capacity": team["team_token_capacity"],
        "user_tpm": user["user_tpm"],
        "user_token_capacity": user["user_token_capacity"],
        "cost": s.cost_micros,
        "prompt_tokens": s.usage.prompt_tokens,
        "completion_tokens": s.usage.completion_tokens,
        "cached_tokens": s.usage.cached_tokens,
        "cache_write_tokens": s.usage.cache_write_tokens,
        "reasoning_tokens": s.usage.reasoning_tokens,
        "key_name": s.key.name,
        "model": s.model,
        "key_alert": UNLIMITED if s.key.alert_micros is None else s.key.alert_micros,
        "team_alert": UNLIMITED if s.team.alert_micros is None else s.team.alert_micros,
        "ledger_max_fields": LEDGER_MAX_FIELDS,
        "abandon": 1 if s.abandoned else 0,
        "window_count": len(s.windows),
        "end_user": s.end_user,
        "quota_count": sum(len(scopes) for scopes in s.quotas),
    }
    alerts = [",".join(str(t) for t in w.alerts) for w in s.windows]
    quotas: list[Arg] = []
    for candidate, scopes in enumerate(s.quotas, 1):
        for q in scopes:
            quotas += [candidate, _or_unlimited(q.tpm)]
    return [*_IN_SETTLE_ARGS_ORDER(named), *alerts, *quotas, *(f"{k}={v}" for k, v in s.tags)]


def renew_args(r: Renewal, now_us: int | None) -> list[Arg]:
    named: dict[str, Arg] = {
        "now_us": "" if now_us is None else now_us,
        "request_id": r.request_id,
        "lease_ttl_ms": r.lease_ttl_ms,
        "quota_count": sum(1 for scopes in r.quotas for q in scopes if q.max_parallel is not None),
    }
    return [named[name] for name in RENEW_ARGS]


def hold_field(upstream: str, model: str) -> str:
    """A target's field in the holds hash."""
    return f"{upstream}\t{model}"


def hold_args(upstream: str, model: str, kind: HoldKind, hold_ms: int, now_us: int | None) -> list[Arg]:
    named: dict[str, Arg] = {
        "now_us": "" if now_us is None else now_us,
        "target": hold_field(upstream, model),
        "hold_ms": hold_ms,
        "kind": kind,
    }
    return [named[name] for name in HOLD_ARGS]


def held_args(now_us: int | None) -> list[Arg]:
    return ["" if now_us is None else now_us]


def decode_held(reply: ScriptReply) -> SharedHolds:
    """held.lua's reply: [now ms, then target, end ms, kind for each hold that has not ended]."""
    now_ms, *rest = reply
    holds = []
    for i in range(0, len(rest) - 2, 3):
        upstream, _, model = _text(rest[i]).partition("\t")
        kind: HoldKind = "tokens" if _text(rest[i + 2]) == "tokens" else "requests"
        holds.append(TargetHold(upstream, model, kind, int(rest[i + 1])))
    return SharedHolds(int(now_ms), tuple(holds))


def _or_unlimited(value: int | None) -> int:
    return UNLIMITED if value is None else value


def decode_settled(reply: ScriptReply) -> Settled:
    """The settle reply: 0 for a duplicate, else [1, key spent, team spent, key crossed, team crossed]."""
    if not isinstance(reply, (list, tuple)):
        return Settled(False)
    applied, key_spent, team_spent, key_crossed, team_crossed, *windows = (int(x) for x in reply)
    return Settled(
        bool(applied),
        key_spent,
        team_spent,
        bool(key_crossed),
        bool(team_crossed),
        tuple(windows[0::2]),
        tuple(windows[1::2]),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bucket(limit: ScriptReply, left: ScriptReply, reset: ScriptReply) -> BucketState | None:
    return None if int(limit) == UNLIMITED else BucketState(int(limit), int(left), int(reset))


def _unless_unlimited(value: ScriptReply) -> int | None:
    return None if int(value) == UNLIMITED else int(value)


STALE = Decision(admitted=False, stale=True)


def decode_decision(reply: ScriptReply) -> Decision:
    """The admit reply: 0 when the request id was already settled or abandoned (nothing changed),
    else [admitted, reason, scope, retry_after_ms, never_fits, request limit, remaining, reset_ms,
    token limit, remaining, reset_ms, budget committed, budget limit, day, day_reset_s, key
    committed, team committed, refusing window, its spent, its limit, shadow windows, shadow
    limits, each window's committed, candidate target (1-based, 0: none), [each quota scope's
    remaining requests, tokens, parallel slots]]."""
    if not isinstance(reply, (list, tuple)):
        return STALE
    admitted, reason, scope, retry, never, *rest = reply
    rq, tk = rest[0:3], rest[3:6]
    spent, limit, day, day_reset, key_committed, team_committed = rest[6:12]
    window, window_spent, window_limit, shadow, shadow_limits, windows_committed, target, left = rest[12:20]
    left = [int(x) for x in left]
    return Decision(
        admitted=bool(int(admitted)),
        reason=cast(Reason, _text(reason)) or None,  # the script answers one of these
        scope=cast(RefusingScope, _text(scope)) or None,
        retry_after_ms=int(retry),
        never_fits=bool(int(never)),
        requests=_bucket(*rq),
        tokens=_bucket(*tk),
        budget_spent_micros=int(spent),
        budget_limit_micros=int(limit),
        day=_text(day),
        day_reset_s=int(day_reset),
        key_committed_micros=_unless_unlimited(key_committed),
        team_committed_micros=_unless_unlimited(team_committed),
        window=int(window) - 1 if int(window) else None,
        window_spent_micros=int(window_spent),
        window_limit_micros=int(window_limit),
        shadow=tuple(int(w) - 1 for w in _text(shadow).split(",") if w),
        shadow_limits=tuple(s for s in _text(shadow_limits).split(",") if s),
        windows_committed_micros=tuple(int(c) for c in _text(windows_committed).split(",") if c),
        target=int(target) - 1 if int(target) else None,
        quota_left=tuple(cast(QuotaLeft, tuple(left[i : i + 3])) for i in range(0, len(left), 3)),
    )


def _scope_state(reply: list[ScriptReply]) -> ScopeState:
    rq, tk = reply[0:3], reply[3:6]
    max_parallel, in_flight, budget, spent, held = (int(x) for x in reply[6:11])
    return ScopeState(
        requests=_bucket(*rq),
        tokens=_bucket(*tk),
        max_parallel=None if max_parallel == UNLIMITED else max_parallel,
        in_flight=in_flight,
        budget=None if budget == UNLIMITED else BudgetState(budget, spent, held),
    )


PEEK_SCOPE_FIELDS = 11  # per scope: request bucket (3), token bucket (3), max_parallel, in flight, budget (3)


def decode_peek(reply: ScriptReply, windows: tuple[WindowBudget, ...]) -> Peek:
    """The admit script's reply to a peek: ['peek', day, day_reset_ms, then for the key, the team and
    the end user PEEK_SCOPE_FIELDS each, then each window budget's spent and held]. Any other reply
    is one of the admit's early answers: the credential's fence (revoked), or 0 for a request id
    already settled (a peek's id is fresh, so never; it would read as empty)."""
    if not isinstance(reply, (list, tuple)) or _text(reply[0]) != "peek":
        return Peek(revoked=decode_decision(reply).reason == "revoked")
    day, day_reset_ms = _text(reply[1]), int(reply[2])
    n = PEEK_SCOPE_FIELDS
    key, team, user = (_scope_state(list(reply[3 + i * n : 3 + (i + 1) * n])) for i in range(3))
    rest = [int(x) for x in reply[3 + 3 * n :]]
    states = tuple(BudgetState(w.micros, rest[2 * i], rest[2 * i + 1]) for i, w in enumerate(windows))
    return Peek(day, day_reset_ms, key, team, user, states)
