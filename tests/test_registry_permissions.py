"""Scoped admins: an admin key with `scope: {team: T}` manages only T's keys and reads only T's
usage and audit; unscoped admin keys come only from the config file."""

from __future__ import annotations

import hashlib

import pytest

from proxy.config import ConfigError, parse_config
from proxy.registry.permissions import (
    LEGACY_ADMIN_NAME,
    Admin,
    admins_from_config,
    audit_team_filter,
    may_manage_keys_of,
    may_manage_teams,
    may_read_team,
    may_read_usage_of,
)

BASE = {
    "upstreams": {"u": {"base_url": "http://x"}},
    "models": {"m": {"targets": [{"upstream": "u", "model": "m"}]}},
    "teams": {"platform": {}, "research": {}},
}


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


ROOT = Admin("root")
LEAD = Admin("research-lead", "research")


@pytest.mark.parametrize(
    ("admin", "team", "allowed"),
    [(ROOT, "research", True), (ROOT, "platform", True), (LEAD, "research", True), (LEAD, "platform", False)],
)
def test_keys_usage_and_team_reads_follow_the_scope(admin: Admin, team: str, allowed: bool) -> None:
    assert may_manage_keys_of(admin, team) is allowed
    assert may_read_usage_of(admin, team) is allowed
    assert may_read_team(admin, team) is allowed


def test_only_unscoped_admins_manage_teams_and_read_all_audit() -> None:
    assert may_manage_teams(ROOT) and not may_manage_teams(LEAD)
    assert audit_team_filter(ROOT) is None and audit_team_filter(LEAD) == "research"


def test_admin_keys_from_config_carry_their_scope() -> None:
    config = parse_config(
        {
            **BASE,
            "admin_key_sha256": sha("legacy"),
            "admin_keys": {
                "root": {"key_sha256": sha("root")},
                "research-lead": {"key_env": "LEAD_KEY", "scope": {"team": "research"}},
                "unset": {"key_env": "NOT_SET"},
            },
        }
    )
    admins = admins_from_config(config, {"LEAD_KEY": "lead"})
    assert admins == {
        sha("legacy"): Admin(LEGACY_ADMIN_NAME),
        sha("root"): Admin("root"),
        sha("lead"): Admin("research-lead", "research"),
    }


@pytest.mark.parametrize(
    ("admin_keys", "environ", "problems"),
    [
        ({"a": {}}, None, ["admin_keys.a: exactly one of key_sha256 or key_env is required"]),
        (
            {"a": {"key_sha256": "0" * 64, "scope": {"teams": "x"}}},
            None,
            ["admin_keys.a.scope.team: required", "admin_keys.a.scope.teams: unknown field"],
        ),
        (
            {"a": {"key_env": "SAME"}, "b": {"key_sha256": sha("same")}},
            {"SAME": "same"},
            ["admin_keys.b: same key as admin_keys.a"],
        ),
    ],
)
def test_bad_admin_keys_are_refused(admin_keys: dict, environ: dict | None, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "admin_keys": admin_keys}, environ)
    assert caught.value.problems == problems
