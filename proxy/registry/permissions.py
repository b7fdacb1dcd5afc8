"""What an admin key may do. Pure: the admin API asks these before acting.

An unscoped admin (the config's `admin_key_*`, or an `admin_keys` entry without `scope`) may do
everything. A scoped admin (`scope: {team: T}`) manages only T's keys and reads only T's usage and
T's audit records; it cannot create, change or delete teams. Unscoped admin keys come only from
the config file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Config

LEGACY_ADMIN_NAME = "admin"  # the name audit records give `admin_key_sha256` / `admin_key_env`


@dataclass(frozen=True, slots=True)
class Admin:
    name: str
    team: str | None = None  # None: unscoped

    @property
    def scoped(self) -> bool:
        return self.team is not None


def may_manage_keys_of(admin: Admin, team: str) -> bool:
    """Create, read, update, rotate or revoke keys of `team`."""
    return admin.team is None or admin.team == team


def may_manage_teams(admin: Admin) -> bool:
    """Create, update or delete teams."""
    return admin.team is None


def may_read_team(admin: Admin, team: str) -> bool:
    """Read a team's settings."""
    return admin.team is None or admin.team == team


def may_read_usage_of(admin: Admin, team: str) -> bool:
    return admin.team is None or admin.team == team


def audit_team_filter(admin: Admin) -> str | None:
    """The team whose audit records this admin may read (None: all of them)."""
    return admin.team


def admins_from_config(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, Admin]:
    """sha256 hex -> Admin, for every admin key the config defines and the environment supplies."""
    env = os.environ if environ is None else environ
    admins: dict[str, Admin] = {}
    legacy = config.admin_sha256(env)
    if legacy is not None:
        admins[legacy] = Admin(LEGACY_ADMIN_NAME)
    for name, key in config.admin_keys.items():
        digest = key.sha256(env)
        if digest is not None:
            admins[digest] = Admin(name, key.scope.team if key.scope else None)
    return admins
