"""Budget, end-user, alert and shadow-mode configuration (issue 13): accepted shapes, their
defaults, and every bad one refused in our words (a fixture per bad config, exact problems)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Alerts, Budget, ConfigError, load_config, parse_config

BAD = Path(__file__).parent / "fixtures" / "bad"
BASE: dict[str, Any] = {
    "upstreams": {"mock": {"base_url": "http://127.0.0.1:9/v1"}},
    "models": {"m": {"targets": [{"upstream": "mock", "model": "m"}]}},
}


def _config(**top: Any) -> Any:
    return parse_config({**BASE, **top})


def _problems(**top: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        _config(**top)
    return refused.value.problems


def test_budgets_on_every_scope() -> None:
    config = _config(
        org={"budgets": [{"window": "month", "usd": 10_000}]},
        teams={
            "platform": {
                "daily_budget_usd": 100,
                "budgets": [{"window": "month", "usd": "2000.50"}],
                "end_users": {
                    "budgets": [{"window": "day", "usd": 5, "enforce": False}],
                    "limits": {"rpm": 10, "tpm": 50_000, "max_parallel": 2},
                },
            }
        },
        keys={"bot": {"team": "platform", "key": "sk-proxy-bot", "budgets": [{"window": "week", "usd": 1}]}},
    )
    assert config.org is not None
    assert config.org.all_budgets() == (Budget(window="month", usd=Decimal(10_000)),)
    team = config.teams["platform"]
    assert team.all_budgets() == (
        Budget(window="day", usd=Decimal(100)),
        Budget(window="month", usd=Decimal("2000.50")),
    )
    assert team.daily_budget_usd == Decimal(100)  # today's readers keep working
    assert team.end_users is not None
    assert team.end_users.all_budgets() == (Budget(window="day", usd=Decimal(5), enforce=False),)
    assert (team.end_users.limits.rpm, team.end_users.limits.tpm, team.end_users.limits.max_parallel) == (10, 50_000, 2)
    assert config.keys["bot"].all_budgets() == (Budget(window="week", usd=Decimal(1)),)


def test_defaults() -> None:
    config = _config(teams={"t": {}})
    assert config.org is None and config.alerts is None
    assert config.teams["t"].all_budgets() == () and config.teams["t"].end_users is None
    assert config.teams["t"].limits.enforce is True
    assert config.end_user_identity == ["safety_identifier", "user", "x-proxy-end-user"]
    assert Alerts() == Alerts(thresholds=[0.5, 0.8, 1.0], webhook_url=None, format="json")


def test_shadow_mode_and_identity_order_and_alerts() -> None:
    config = _config(
        teams={"t": {"limits": {"rpm": 5, "enforce": False}}},
        end_user_identity=["x-proxy-end-user", "user"],
        alerts={"thresholds": [0.9, 1], "webhook_url": "https://hooks.slack.example/T1", "format": "slack"},
    )
    assert config.teams["t"].limits.enforce is False
    assert config.end_user_identity == ["x-proxy-end-user", "user"]
    assert config.alerts == Alerts(thresholds=[0.9, 1.0], webhook_url="https://hooks.slack.example/T1", format="slack")


def test_every_bad_budget_and_price_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(BAD / "budgets_and_prices.yaml", environ={})
    assert refused.value.problems == [
        "models.m.price: no catalog price for 'not-in-catalog' (`llm-proxy prices` lists the catalog)",
        "models.n.price: no catalog price for 'gpt-99' (`llm-proxy prices` lists the catalog)",
        "models.o.price: must be `catalog` or {catalog: NAME}",
        "models.p.price_per_mtok.tiers: above_input_tokens must increase from one tier to the next",
        "teams.t: daily_budget_usd and a day budget in budgets: give one of them",
        "teams.u.budgets: more than one budget for the week window: give one per window",
        "teams.u.end_users.budgets.0.window: must be 'day', 'week' or 'month'",
        "teams.u.end_users.limits.rpm: must be > 0",
        "teams.u.end_users.limits.enforce: must be true or false",
        "org.budgets.0.usd: must be > 0",
        "end_user_identity: each source at most once: user repeated",
        "alerts.thresholds: must increase",
        "alerts.webhook_url: must start with http:// or https://",
        "alerts.format: must be 'json' or 'slack'",
    ]


@pytest.mark.parametrize(
    ("top", "problems"),
    [
        (
            {
                "keys": {"k": {"team": "t", "key": "sk-x", "budgets": [{"window": "day", "usd": -1}]}},
                "teams": {"t": {}},
            },
            ["keys.k.budgets.0.usd: must be > 0"],
        ),
        (
            {
                "teams": {
                    "t": {
                        "budgets": [
                            {"window": "day", "usd": 1},
                            {"window": "day", "usd": 2},
                            {"window": "month", "usd": 3},
                            {"window": "month", "usd": 4},
                        ]
                    }
                }
            },
            ["teams.t.budgets: more than one budget for the day, month window: give one per window"],
        ),
        ({"teams": {"t": {"budgets": [{"window": "day"}]}}}, ["teams.t.budgets.0.usd: required"]),
        (
            {"org": {"budgets": [{"window": "year", "usd": 1}]}},
            ["org.budgets.0.window: must be 'day', 'week' or 'month'"],
        ),
        ({"org": {"limits": {"rpm": 1}}}, ["org.limits: unknown field"]),
        (
            {"teams": {"t": {"end_users": {"limits": {"rpm": 1}, "keys": []}}}},
            ["teams.t.end_users.keys: unknown field"],
        ),
        (
            {"end_user_identity": ["email"]},
            ["end_user_identity.0: must be 'safety_identifier', 'user' or 'x-proxy-end-user'"],
        ),
        ({"end_user_identity": []}, ["end_user_identity: must not be empty"]),
        (
            {"alerts": {"thresholds": [0, 1.5]}},
            ["alerts.thresholds: each threshold must be > 0 and <= 1 (a fraction of the budget)"],
        ),
        ({"alerts": {"thresholds": []}}, ["alerts.thresholds: must not be empty"]),
        (
            {"org": {"budgets": [{"window": "month", "usd": 1}]}, "store": {"redis_url": "redis+cluster://r:6379"}},
            [
                "org: an org budget needs standalone Redis: it is checked in the same script as every team's "
                "limits, and on a Redis Cluster each team lives in its own slot"
            ],
        ),
        (
            {"alerts": {}, "alert_webhook_url": "http://a.example", "budget_alert_ratio": 0.5},
            [
                "budget_alert_ratio: give alerts or budget_alert_ratio, not both",
                "alert_webhook_url: give alerts or alert_webhook_url, not both",
            ],
        ),
    ],
)
def test_refused_in_our_words(top: dict[str, Any], problems: list[str]) -> None:
    assert _problems(**top) == problems
