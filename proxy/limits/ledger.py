"""The spend ledger: one hash per team and day, read back into the `usage()` report.

Fields are `<kind> SEP <name>... SEP <metric>` with integer values (HINCRBY):

    team SEP spend_micros                     the team
    key SEP <key> SEP requests                one key of the team
    model SEP <key> SEP <model> SEP ...       one model used by that key
    tag SEP <name=value> SEP ...              one tag of the requests
    end_user SEP <end user> SEP ...           one end user (safety_identifier, user, x-proxy-end-user)

`usage(day, teams)` returns::

    {"date": day, "teams": {team: {<metrics>,
        "keys": {key: {<metrics>, "models": {model: {<metrics>}}}},
        "tags": {"role=x": {<metrics>}}, "end_users": {name: {<metrics>}}}}}

where <metrics> are the integers spend_micros, requests, prompt_tokens, completion_tokens,
cached_tokens, cache_write_tokens (both within prompt_tokens) and reasoning_tokens (within
completion_tokens): every class the invoice prices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SEP = "\x1f"
METRICS = (
    "spend_micros",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def _zero() -> dict[str, Any]:
    return dict.fromkeys(METRICS, 0)


def team_usage(fields: Mapping[str, int]) -> dict[str, Any]:
    """One team's report from its ledger hash (field -> integer)."""
    team = {**_zero(), "keys": {}, "tags": {}, "end_users": {}}
    for field, value in fields.items():
        kind, *names, metric = field.split(SEP)
        if metric not in METRICS:
            continue
        if kind == "team" and not names:
            team[metric] += value
        elif kind == "key" and len(names) == 1:
            key = team["keys"].setdefault(names[0], {**_zero(), "models": {}})
            key[metric] += value
        elif kind == "model" and len(names) == 2:
            key = team["keys"].setdefault(names[0], {**_zero(), "models": {}})
            key["models"].setdefault(names[1], _zero())[metric] += value
        elif kind == "tag" and names:
            team["tags"].setdefault(SEP.join(names), _zero())[metric] += value
        elif kind == "end_user" and names:
            team["end_users"].setdefault(SEP.join(names), _zero())[metric] += value
    return team


def merged(reports: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """One report summing `usage()` reports of several days (a week's or month's), named `label`."""

    def add(into: dict[str, Any], line: Mapping[str, Any]) -> None:
        for name, value in line.items():
            if isinstance(value, dict):
                for child, child_line in value.items():
                    add(into.setdefault(name, {}).setdefault(child, {}), child_line)
            else:
                into[name] = into.get(name, 0) + value

    teams: dict[str, Any] = {}
    for report in reports:
        for team, line in report["teams"].items():
            add(teams.setdefault(team, {**_zero(), "keys": {}, "tags": {}, "end_users": {}}), line)
    return {"date": label, "teams": teams}


def usage_report(day: str, ledgers: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """The `usage()` report of `day` from each team's ledger hash."""
    return {"date": day, "teams": {team: team_usage(fields) for team, fields in ledgers.items()}}
