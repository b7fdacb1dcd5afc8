"""Stored entries decoded: a `Snapshot` is the whole registry at one version."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import ValidationError

from .entries import KeyEntry, TeamEntry
from .store import RawSnapshot

log = logging.getLogger("proxy.registry")


@dataclass(frozen=True)
class Snapshot:
    version: int
    keys: dict[str, KeyEntry] = field(default_factory=dict)
    teams: dict[str, TeamEntry] = field(default_factory=dict)


def decode(raw: RawSnapshot) -> Snapshot:
    """Every entry that parses; one that does not (written by a newer release?) is skipped and logged."""
    keys: dict[str, KeyEntry] = {}
    for name, (text, rev) in raw.keys.items():
        try:
            keys[name] = KeyEntry.model_validate_json(text).model_copy(update={"rev": rev})
        except ValidationError:
            log.warning("registry key %r is unreadable; ignored", name)
    teams: dict[str, TeamEntry] = {}
    for name, (text, rev) in raw.teams.items():
        try:
            teams[name] = TeamEntry.model_validate_json(text).model_copy(update={"rev": rev})
        except ValidationError:
            log.warning("registry team %r is unreadable; ignored", name)
    return Snapshot(raw.version, keys, teams)
