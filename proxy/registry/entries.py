"""What the admin API sends (specs and patches) and what the registry stores (entries).

Names end up inside store key names and hash tags (`llmrl:{team}:...`), so they are restricted to
`NAME_PATTERN`. An entry's credentials hold only sha256 digests; `public()` is what may leave the
process (API replies, CLI tables) and never includes them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..config import DEFAULT_MAX_QUEUE, MAX_SHARE, MIN_SHARE, Integer, Limits, Number, Priority

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_METADATA_ITEMS = 32
Metadata = dict[str, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budgets(_Strict):
    daily_usd: Decimal | None = Field(None, gt=0)


class EndUserDefaults(_Strict):
    """What applies to each end user of a team (by `user` field or JWT `user_claim`)."""

    limits: Limits = Limits()
    budgets: Budgets = Budgets()


class _Patch(_Strict):
    """A patch: a field left out stays as it is; one given must have a value (null is no value)."""

    @field_validator("*")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name not in NULLABLE:
            raise ValueError("may not be null: leave the field out to keep its value")
        return value


NULLABLE = frozenset({"models", "expires_at"})  # null: every model, never expires


class KeySpec(_Strict):
    """`POST /admin/keys`."""

    name: str = Field(pattern=NAME_PATTERN)
    team: str = Field(pattern=NAME_PATTERN)
    limits: Limits = Limits()
    priority: Priority = "normal"  # its requests' class in the queue, as a config key's
    budgets: Budgets = Budgets()
    models: list[str] | None = None
    expires_at: AwareDatetime | None = None
    metadata: Metadata = Field(default_factory=dict, max_length=MAX_METADATA_ITEMS)


class KeyPatch(_Patch):
    """`PATCH /admin/keys/{name}`: only the fields given change (a key never changes team)."""

    limits: Limits | None = None
    priority: Priority | None = None
    budgets: Budgets | None = None
    models: list[str] | None = None
    expires_at: AwareDatetime | None = None
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_ITEMS)


class TeamSpec(_Strict):
    """`POST /admin/teams`."""

    name: str = Field(pattern=NAME_PATTERN)
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    end_user_defaults: EndUserDefaults = EndUserDefaults()
    share: Number = Field(1, ge=MIN_SHARE, le=MAX_SHARE)  # its weight when teams wait for capacity, as in config
    max_queue: Integer = Field(DEFAULT_MAX_QUEUE, ge=0)  # its waiters per replica
    metadata: Metadata = Field(default_factory=dict, max_length=MAX_METADATA_ITEMS)


class TeamPatch(_Patch):
    """`PATCH /admin/teams/{name}`."""

    limits: Limits | None = None
    share: Number | None = Field(None, ge=MIN_SHARE, le=MAX_SHARE)
    max_queue: Integer | None = Field(None, ge=0)
    budgets: Budgets | None = None
    end_user_defaults: EndUserDefaults | None = None
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_ITEMS)


class Credential(_Strict):
    """One secret of a key, by digest. `id` (random, not secret) names its revocation fence;
    `until_ms` (store clock) ends it: set by a rotation's grace."""

    id: str
    sha256: str
    until_ms: int | None = None


class KeyEntry(_Strict):
    name: str
    team: str
    limits: Limits = Limits()
    priority: Priority = "normal"
    budgets: Budgets = Budgets()
    models: list[str] | None = None
    expires_at: datetime | None = None
    metadata: Metadata = {}
    credentials: list[Credential]  # newest first
    created_ms: int
    updated_ms: int
    rev: int = 0  # the registry version of its last write (not stored in its JSON)

    @property
    def expires_ms(self) -> int | None:
        return None if self.expires_at is None else int(self.expires_at.timestamp() * 1000)

    def ends_ms(self, credential: Credential) -> int | None:
        """When `credential` stops working: its grace or the key's expiry, whichever is first."""
        ends = [t for t in (credential.until_ms, self.expires_ms) if t is not None]
        return min(ends) if ends else None

    def public(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"credentials", "rev"})
        data["source"] = "api"
        return data


class TeamEntry(_Strict):
    name: str
    limits: Limits = Limits()
    budgets: Budgets = Budgets()
    end_user_defaults: EndUserDefaults = EndUserDefaults()
    share: Number = 1
    max_queue: Integer = DEFAULT_MAX_QUEUE
    metadata: Metadata = {}
    created_ms: int
    updated_ms: int
    rev: int = 0

    def public(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"rev"})
        data["source"] = "api"
        return data


def stored_json(entry: KeyEntry | TeamEntry) -> str:
    return entry.model_dump_json(exclude={"rev"})
