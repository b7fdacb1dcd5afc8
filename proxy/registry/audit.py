"""The audit trail's record: who (admin key by name), when, what, on which entry, and the new
values of the fields that changed. Built only from specs and patches, which hold no secret; a
credential (digest or key) is never part of one."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Action = Literal["create", "update", "rotate", "revoke", "delete"]

log = logging.getLogger("proxy.registry")


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at_ms: int
    admin: str  # the admin key's config name
    action: Action
    kind: Literal["key", "team"]
    target: str
    team: str | None  # the team the target belongs to (a team: itself), for scoped readers
    changes: dict[str, Any] = {}


def record(
    at_ms: int,
    admin: str,
    action: Action,
    kind: Literal["key", "team"],
    target: str,
    team: str | None,
    changes: dict[str, Any],
) -> AuditRecord:
    entry = AuditRecord(
        at_ms=at_ms,
        admin=admin,
        action=action,
        kind=kind,
        target=target,
        team=team,
        changes=json.loads(json.dumps(changes, default=str)),
    )
    log.info(
        "registry %s %s %r by admin %r (fields: %s)", action, kind, target, admin, ", ".join(sorted(changes)) or "-"
    )
    return entry
