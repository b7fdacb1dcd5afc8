"""The usage report (admin API, `llm-proxy usage`): the ledger joined with the config's budgets."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from ..config import Config
from ..pricing.cost import micros_to_usd, usd_to_micros

Report = dict[str, Any]  # a JSON object of the report
TOP_END_USERS = 100  # a team's end users in a report: the top spenders
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens")


def _usd(micros: int) -> float:
    return float(micros_to_usd(micros))


def _line(metrics: Report | None, budget_usd: Decimal | None = None) -> Report:
    metrics = metrics or {}
    spend = metrics.get("spend_micros", 0)
    line: Report = {"spend_usd": _usd(spend), "spend_micros": spend, **{name: metrics.get(name, 0) for name in COUNTS}}
    if budget_usd is not None:
        budget = usd_to_micros(budget_usd)
        line.update(budget_usd=_usd(budget), remaining_usd=_usd(max(0, budget - spend)))
    else:
        line.update(budget_usd=None, remaining_usd=None)
    return line


def usage_overview(config: Config, report: Report) -> Report:
    """Every configured team and key (zero where unused), with models and tags as the ledger has them."""
    teams: Report = {}
    total: Report = {"spend_micros": 0, **dict.fromkeys(COUNTS, 0)}
    for team_name, team in config.teams.items():
        ledger = report["teams"].get(team_name, {})
        line = _line(ledger, team.daily_budget_usd)
        keys: Report = {}
        for key_name, key in config.keys.items():
            if key.team != team_name:
                continue
            key_ledger = ledger.get("keys", {}).get(key_name, {})
            keys[key_name] = {
                **_line(key_ledger, key.daily_budget_usd),
                "models": {m: _line(v) for m, v in key_ledger.get("models", {}).items()},
            }
        line["keys"] = keys
        line["tags"] = {tag: _line(v) for tag, v in ledger.get("tags", {}).items()}
        spenders = sorted(ledger.get("end_users", {}).items(), key=lambda item: (-item[1]["spend_micros"], item[0]))
        line["end_users"] = {name: _line(v) for name, v in spenders[:TOP_END_USERS]}
        teams[team_name] = line
        for name in total:
            total[name] += ledger.get(name, 0)
    return {"date": report["date"], "currency": "USD", "total": _line(total), "teams": teams}


def keys_overview(config: Config) -> Report:
    def limits(value: BaseModel) -> Report:
        return value.model_dump(exclude_none=True)

    return {
        "teams": {
            name: {
                "limits": limits(team.limits),
                "daily_budget_usd": float(team.daily_budget_usd) if team.daily_budget_usd else None,
                "share": team.share,
                "max_queue": team.max_queue,
            }
            for name, team in config.teams.items()
        },
        "keys": {
            name: {
                "team": key.team,
                "limits": limits(key.limits),
                "daily_budget_usd": float(key.daily_budget_usd) if key.daily_budget_usd else None,
                "models": key.models,
                "priority": key.priority,
            }
            for name, key in config.keys.items()
        },
    }


GROUPINGS = ("team", "key", "model", "tag", "end_user")


def grouped(overview: Report, by: str) -> Report:
    """The overview as one grouping's rows (the admin API's `?by=`, the CLI's `--by` table):
    `{"date", "currency", "by", "total", "rows": [...]}`, each row naming its group (see `rows`)."""
    return {
        "date": overview["date"],
        "currency": overview["currency"],
        "by": by,
        "total": overview["total"],
        "rows": rows(overview, by),
    }


def rows(overview: Report, by: str) -> list[Report]:
    """Flat rows for a table: by team, key, model, tag or end user (the top spenders first).

    Each row names its group (`team`; with `key`; with `key` and `model`; with `tag`; with
    `end_user`) beside the figures of `_line`; a team's or key's carries its budget and remaining,
    the others None. Teams and keys in config order, models and tags as the ledger has them, each
    team's end users (its top `TOP_END_USERS`) the top spender first."""
    out: list[Report] = []
    for team_name, team in overview["teams"].items():
        if by == "team":
            out.append({"team": team_name, **_flat(team)})
        elif by == "key":
            out += [{"team": team_name, "key": k, **_flat(v)} for k, v in team["keys"].items()]
        elif by == "model":
            out += [
                {"team": team_name, "key": k, "model": m, **_flat(mv)}
                for k, v in team["keys"].items()
                for m, mv in v["models"].items()
            ]
        elif by == "tag":
            out += [{"team": team_name, "tag": t, **_flat(v)} for t, v in team["tags"].items()]
        elif by == "end_user":
            out += [{"team": team_name, "end_user": u, **_flat(v)} for u, v in team.get("end_users", {}).items()]
    return out


def _flat(line: Report) -> Report:
    return {k: v for k, v in line.items() if k not in ("keys", "models", "tags", "end_users")}
