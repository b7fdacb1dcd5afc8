"""The one YAML file: pydantic models, `${ENV_VAR}` interpolation, readable errors.

The field names here are a public contract (README, deploy/, users' files): keep them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .config_yaml import load_yaml
from .errors import ConfigError
from .pricing.catalog import catalog_price_fields

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 100  # waiters per team and replica
MAX_WAIT_MS = 600_000  # ten minutes: the longest a client's own timeout is likely to allow
ENV_VAR_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class EnvText(str):
    """A string value that came from `${VAR}`. The environment holds only strings, so integer and
    number fields parse these; a string written in the file (`rpm: "10"`) is refused there."""


def _integer(value: object) -> object:
    if isinstance(value, EnvText):
        try:
            return int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("must be an integer")


def _number(value: object) -> object:
    if isinstance(value, EnvText):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise ValueError("must be a number")


Integer = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, BeforeValidator(_number)]
# a team's share: bounded so that a fair share's steps (tokens / share) stay exact in a double
MIN_SHARE, MAX_SHARE = 0.001, 1_000_000


def _env_is_set(name: str | None, info: ValidationInfo) -> str | None:
    """A `*_env` field must name a variable with a value, when validating against an environment."""
    environ = (info.context or {}).get("environ")
    if name is None or environ is None:
        return name
    if name not in environ:
        raise ValueError(f"environment variable {name} is not set")
    if not environ[name]:
        raise ValueError(f"environment variable {name} is empty")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: Integer = Field(DEFAULT_PORT, ge=1, le=65535)


class Server(_Strict):
    """The HTTP server's defences against hostile connections (per process)."""

    max_header_bytes: int = Field(64 * 1024, ge=1024)  # request line + headers; beyond: 431
    header_timeout_s: float = Field(10, gt=0)  # connection (or next request) start to headers complete
    body_timeout_s: float = Field(30, gt=0)  # headers complete to body complete; beyond: 408
    max_connections: int = Field(1000, gt=0)  # beyond: the oldest still sending headers is dropped


class Store(_Strict):
    redis_url: str | None = None
    cluster: bool = False
    on_redis_error: Literal["allow", "deny"] = "allow"
    replicas: Integer = Field(1, gt=0)  # the fallback limiter divides limits by this
    timeout_ms: Integer = Field(250, gt=0)
    lease_ttl_s: Integer = Field(900, gt=0)  # a parallel slot outlives a dead replica this long

    @property
    def is_cluster(self) -> bool:
        return self.cluster or (self.redis_url or "").startswith("redis+cluster://")


class Quota(_Strict):
    """A provider's quota (`upstreams.NAME.limits`, a target's `limits`): per minute, no burst."""

    rpm: Integer | None = Field(None, gt=0)
    tpm: Integer | None = Field(None, gt=0)
    max_parallel: Integer | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _limits_something(self) -> Quota:
        if self.rpm is None and self.tpm is None and self.max_parallel is None:
            raise ValueError("give rpm, tpm or max_parallel (a quota without them limits nothing)")
        return self


class Upstream(_Strict):
    """`api: anthropic`: `base_url` as the Anthropic SDK takes it (no `/v1`); the proxy calls
    `{base_url}/v1/messages` with `x-api-key`. `api: openai`: `base_url` ends where OpenAI's
    `/v1` does."""

    base_url: str
    api: Literal["openai", "anthropic"] = "openai"
    api_key: str | None = None
    api_key_env: str | None = None
    timeout_s: Number = Field(120, gt=0)
    connect_timeout_s: Number = Field(5, gt=0)
    max_connections: Integer = Field(200, gt=0)
    max_retries: Integer = Field(2, ge=0, le=10)
    max_hold_s: Number = Field(60, ge=0)  # the longest a 429 or a limit at zero holds a target; 0: never
    limits: Quota | None = None  # the provider account's quota, shared by every model sent here

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _one_api_key_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("api_key") is not None:
            raise ValueError("give api_key or api_key_env, not both")
        return _env_is_set(value, info)

    def resolve_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key
        if self.api_key_env is not None:
            return os.environ.get(self.api_key_env)
        return None


class Target(_Strict):
    upstream: str
    model: str
    limits: Quota | None = None  # this deployment's quota (the upstream and model), on top of the upstream's


class PriceTier(_Strict):
    """Long-context prices: for a request whose prompt exceeds `above_input_tokens`, the prices
    named here replace the base ones (any subset; the rest stay the model's)."""

    above_input_tokens: Integer = Field(gt=0)
    input: Decimal | None = Field(None, ge=0)
    output: Decimal | None = Field(None, ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    cache_write: Decimal | None = Field(None, ge=0)
    reasoning: Decimal | None = Field(None, ge=0)


class Price(_Strict):
    """USD per million tokens. `cached_input` (cache reads) and `cache_write` default to `input`,
    `reasoning` to `output`; `proxy.pricing.cost` says which tokens each price applies to."""

    input: Decimal = Field(Decimal(0), ge=0)
    output: Decimal = Field(Decimal(0), ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    cache_write: Decimal | None = Field(None, ge=0)
    reasoning: Decimal | None = Field(None, ge=0)
    tiers: list[PriceTier] = []

    @cached_property
    def memo(self) -> dict[str, object]:
        """What is worked out from these prices once and kept with them, so it lives as long as this
        config: `proxy.pricing.cost.price_table` keeps the rates of each tier here."""
        return {}

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, tiers: list[PriceTier]) -> list[PriceTier]:
        thresholds = [tier.above_input_tokens for tier in tiers]
        if any(a >= b for a, b in pairwise(thresholds)):
            raise ValueError("above_input_tokens must increase from one tier to the next")
        return tiers


class CatalogPrice(_Strict):
    catalog: str = Field(min_length=1)


class BudgetFallback(_Strict):
    """`on_budget_exhausted`: a request its budget refuses on this model is served by `fallback_model`
    (of the same api) when it fits there."""

    fallback_model: str = Field(min_length=1)


class Model(_Strict):
    """`price: catalog` (the entry named like the first target's model) or `price: {catalog: NAME}`
    takes the price from the shipped catalog (`llm-proxy prices`); `price_per_mtok` fields given
    beside it override the catalog's (`tiers`, when given, replace the catalog's tiers)."""

    targets: list[Target] = Field(min_length=1)
    context_window: Integer | None = Field(None, gt=0)
    default_max_tokens: Integer = Field(1024, gt=0)
    price: Literal["catalog"] | CatalogPrice | None = None
    price_per_mtok: Price = Price()
    context_overflow: Literal["reject", "truncate"] = "reject"
    on_budget_exhausted: BudgetFallback | None = None

    @model_validator(mode="before")
    @classmethod
    def _price_from_catalog(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("price") is None:
            return data
        entry = catalog_price_fields(_catalog_name(data.get("price"), data.get("targets")))
        overrides = data.get("price_per_mtok")
        if entry is None or (overrides is not None and not isinstance(overrides, dict)):
            return data  # `price` or `price_per_mtok` reports the problem
        return {**data, "price_per_mtok": {**entry, **(overrides or {})}}

    @field_validator("price", mode="before")
    @classmethod
    def _catalog_reference(cls, value: Any) -> Any:
        if value is None or value == "catalog" or (isinstance(value, dict) and set(value) == {"catalog"}):
            return value
        raise ValueError("must be `catalog` or {catalog: NAME}")

    @field_validator("price")
    @classmethod
    def _known_catalog_entry(
        cls, value: Literal["catalog"] | CatalogPrice | None, info: ValidationInfo
    ) -> Literal["catalog"] | CatalogPrice | None:
        if value is None:
            return value
        targets = info.data.get("targets")
        if targets is None:
            return value  # targets already refused
        name = _catalog_name(value, [{"model": target.model} for target in targets])
        if catalog_price_fields(name) is None:
            raise ValueError(f"no catalog price for {name!r} (`llm-proxy prices` lists the catalog)")
        return value

    @property
    def has_price(self) -> bool:
        """False when neither `price` nor `price_per_mtok` is configured: its spend would read $0."""
        return self.price is not None or "price_per_mtok" in self.model_fields_set


def _catalog_name(price: Any, targets: Any) -> str:
    if isinstance(price, CatalogPrice):
        return price.catalog
    if isinstance(price, dict) and isinstance(price.get("catalog"), str):
        return str(price["catalog"])
    if isinstance(targets, list) and targets:
        first = targets[0]
        model = first.get("model") if isinstance(first, dict) else getattr(first, "model", None)
        if isinstance(model, str):
            return model
    return ""


class Limits(_Strict):
    rpm: Integer | None = Field(None, gt=0)
    tpm: Integer | None = Field(None, gt=0)
    max_parallel: Integer | None = Field(None, gt=0)
    rpm_burst: Integer | None = Field(None, gt=0)  # bucket capacities (default: one minute's worth)
    tpm_burst: Integer | None = Field(None, gt=0)
    enforce: bool = True  # false: shadow mode (would-be refusals are counted and logged, never made)
    # how long a request these limits refuse may wait for capacity (key's, else team's; unset: 0, refuse at once)
    max_wait_ms: Integer | None = Field(None, ge=0, le=MAX_WAIT_MS)

    @field_validator("rpm_burst", "tpm_burst")
    @classmethod
    def _burst_has_rate(cls, value: int | None, info: ValidationInfo) -> int | None:
        rate = (info.field_name or "").removesuffix("_burst")
        if value is not None and rate in info.data and info.data[rate] is None:  # (absent: already refused)
            raise ValueError(f"needs {rate} (a burst alone limits nothing)")
        return value


Window = Literal["day", "week", "month"]
Priority = Literal["high", "normal", "low"]
EndUserSource = Literal["safety_identifier", "user", "x-proxy-end-user"]


class Budget(_Strict):
    """A spend cap over one calendar window in `budget_timezone`."""

    window: Window
    usd: Decimal = Field(gt=0)
    enforce: bool = True  # false: shadow mode (would-be refusals are counted and logged, never made)


class _Budgeted(_Strict):
    """A scope with `budgets`; `daily_budget_usd: X` is shorthand for `[{window: day, usd: X}]`."""

    daily_budget_usd: Decimal | None = Field(None, gt=0)
    budgets: list[Budget] = []

    @field_validator("budgets")
    @classmethod
    def _one_budget_per_window(cls, budgets: list[Budget]) -> list[Budget]:
        windows = [budget.window for budget in budgets]
        repeated = sorted({window for window in windows if windows.count(window) > 1}, key=windows.index)
        if repeated:
            raise ValueError("more than one budget for the " + ", ".join(repeated) + " window: give one per window")
        return budgets

    @model_validator(mode="after")
    def _shorthand_or_day_budget(self) -> _Budgeted:
        if self.daily_budget_usd is not None and any(budget.window == "day" for budget in self.budgets):
            raise ValueError("daily_budget_usd and a day budget in budgets: give one of them")
        return self

    def all_budgets(self) -> tuple[Budget, ...]:
        """Every budget of this scope, `daily_budget_usd` as its day budget."""
        shorthand = () if self.daily_budget_usd is None else (Budget(window="day", usd=self.daily_budget_usd),)
        return shorthand + tuple(self.budgets)


class EndUsers(_Budgeted):
    """Budgets and limits that apply to each distinct end user of a team, separately."""

    limits: Limits = Limits()

    @field_validator("limits")
    @classmethod
    def _no_wait_of_its_own(cls, limits: Limits) -> Limits:
        if limits.max_wait_ms is not None:
            raise ValueError("max_wait_ms is set on the key or the team: an end user's requests wait as theirs do")
        return limits


class Org(_Budgeted):
    """All traffic through this deployment."""


class Alerts(_Strict):
    """Budget alerts: each threshold (a fraction of a budget) fires once per scope and window."""

    thresholds: list[Number] = Field([0.5, 0.8, 1.0], min_length=1)
    webhook_url: str | None = None
    format: Literal["json", "slack"] = "json"

    @field_validator("thresholds")
    @classmethod
    def _fractions_ascending(cls, thresholds: list[float]) -> list[float]:
        if any(not 0 < threshold <= 1 for threshold in thresholds):
            raise ValueError("each threshold must be > 0 and <= 1 (a fraction of the budget)")
        if any(a >= b for a, b in pairwise(thresholds)):
            raise ValueError("must increase")
        return thresholds

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class Team(_Budgeted):
    limits: Limits = Limits()
    end_users: EndUsers | None = None
    share: Number = Field(1, ge=MIN_SHARE, le=MAX_SHARE)  # its weight when teams wait for the same capacity
    max_queue: Integer = Field(DEFAULT_MAX_QUEUE, ge=0)  # its waiters per replica; beyond: 429 at once


class Key(_Budgeted):
    team: str
    key_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    key_env: str | None = None
    key: str | None = Field(None, min_length=1)
    limits: Limits = Limits()
    models: list[str] | None = None
    priority: Priority = "normal"  # its requests' class in the queue (a request may ask for a lower one)

    @model_validator(mode="after")
    def _one_key_source(self) -> Key:
        given = [f for f in ("key_sha256", "key_env", "key") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of key_sha256, key_env or key is required")
        return self

    @field_validator("key_env")
    @classmethod
    def _key_env_set(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _env_is_set(value, info)

    def sha256(self, environ: Mapping[str, str]) -> str | None:
        """The key's sha256 hex, or None when its `key_env` has no value."""
        if self.key_sha256 is not None:
            return self.key_sha256
        secret = self.key if self.key is not None else environ.get(self.key_env or "")
        return hashlib.sha256(secret.encode("utf-8")).hexdigest() if secret else None


class JwtAuth(_Strict):
    """`auth.jwt`: tokens from the organisation's identity provider (RS256 / ES256 only)."""

    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    jwks_url: str | None = None
    jwks_file: str | None = None
    team_claim: str = Field(min_length=1)
    user_claim: str = Field("sub", min_length=1)

    @model_validator(mode="after")
    def _one_jwks_source(self) -> JwtAuth:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("exactly one of jwks_url or jwks_file is required")
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("jwks_url must start with http:// or https://")
        return self


class Auth(_Strict):
    jwt: JwtAuth | None = None


class AdminScope(_Strict):
    team: str = Field(min_length=1)


class AdminKey(_Strict):
    """A named admin key; with `scope` it manages one team's keys and reads only its usage."""

    key_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    key_env: str | None = None
    scope: AdminScope | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> AdminKey:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("exactly one of key_sha256 or key_env is required")
        return self

    @field_validator("key_env")
    @classmethod
    def _key_env_set(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _env_is_set(value, info)

    def sha256(self, environ: Mapping[str, str]) -> str | None:
        if self.key_sha256 is not None:
            return self.key_sha256
        secret = environ.get(self.key_env or "")
        return hashlib.sha256(secret.encode("utf-8")).hexdigest() if secret else None


class Config(_Strict):
    listen: Listen = Listen()
    server: Server = Server()
    admin_key_sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    admin_key_env: str | None = None
    admin_keys: dict[str, AdminKey] = {}
    auth: Auth = Auth()
    max_body_bytes: Integer = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    store: Store = Store()
    budget_timezone: str = "UTC"
    budget_alert_ratio: Number = Field(0.8, gt=0, le=1)
    alert_webhook_url: str | None = None
    spend_retention_days: Integer = Field(35, gt=0)
    response_retention_days: Integer = Field(30, gt=0)  # how long a response id leads to its creator
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_bodies: bool = False
    shutdown_grace_s: Number = Field(30, ge=0)
    upstreams: dict[str, Upstream] = Field(min_length=1)
    models: dict[str, Model] = Field(min_length=1)
    teams: dict[str, Team] = {}
    keys: dict[str, Key] = {}
    org: Org | None = None
    end_user_identity: list[EndUserSource] = Field(["safety_identifier", "user", "x-proxy-end-user"], min_length=1)
    alerts: Alerts | None = None

    @field_validator("end_user_identity")
    @classmethod
    def _sources_once(cls, sources: list[str]) -> list[str]:
        repeated = sorted({source for source in sources if sources.count(source) > 1}, key=sources.index)
        if repeated:
            raise ValueError("each source at most once: " + ", ".join(repeated) + " repeated")
        return sources

    @field_validator("budget_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("admin_key_env")
    @classmethod
    def _admin_key_env_set(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _env_is_set(value, info)

    def admin_sha256(self, environ: Mapping[str, str]) -> str | None:
        """The admin key's sha256 hex, or None when there is none."""
        if self.admin_key_sha256:
            return self.admin_key_sha256
        secret = environ.get(self.admin_key_env or "")
        return hashlib.sha256(secret.encode("utf-8")).hexdigest() if secret else None

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Config:
        problems = self._reference_problems()
        if self.admin_key_sha256 and self.admin_key_env:
            problems.append("admin_key_sha256: give admin_key_sha256 or admin_key_env, not both")
        if self.alerts is not None:
            problems += [
                f"{field}: give alerts or {field}, not both"
                for field in ("budget_alert_ratio", "alert_webhook_url")
                if field in self.model_fields_set
            ]
        if self.org is not None and self.org.all_budgets() and self.store.is_cluster:
            problems.append(
                "org: an org budget needs standalone Redis: it is checked in the same script as every "
                "team's limits, and on a Redis Cluster each team lives in its own slot"
            )
        problems += self._quota_problems()
        problems += self._shared_key_problems((info.context or {}).get("environ") or {})
        if problems:
            raise ConfigError(problems)
        return self

    def _reference_problems(self) -> list[str]:
        problems = []
        for name, model in self.models.items():
            for i, target in enumerate(model.targets):
                if target.upstream not in self.upstreams:
                    problems.append(f"models.{name}.targets.{i}.upstream: unknown upstream {target.upstream!r}")
            apis = {self.upstreams[t.upstream].api for t in model.targets if t.upstream in self.upstreams}
            if len(apis) > 1:
                mixed = " and ".join(sorted(apis))
                problems.append(f"models.{name}.targets: every target's upstream must speak one api, not {mixed}")
        problems += self._budget_fallback_problems()
        for name, key in self.keys.items():
            if key.team not in self.teams:
                problems.append(f"keys.{name}.team: unknown team {key.team!r}")
            for model_name in key.models or ():
                if model_name not in self.models:
                    problems.append(f"keys.{name}.models: unknown model {model_name!r}")
        return problems

    def _budget_fallback_problems(self) -> list[str]:
        """A fallback model must exist, answer the same endpoints, and not lead back (one hop is
        taken per request, but a cycle says the config does not know which model is the cheap one)."""
        problems = []
        cycles: set[frozenset[str]] = set()
        for name, model in self.models.items():
            if model.on_budget_exhausted is None:
                continue
            where = f"models.{name}.on_budget_exhausted.fallback_model"
            fallback = model.on_budget_exhausted.fallback_model
            if fallback not in self.models:
                problems.append(f"{where}: unknown model {fallback!r}")
                continue
            pair = (model, self.models[fallback])
            if all(t.upstream in self.upstreams for m in pair for t in m.targets):
                ours, theirs = (self.api_of(m) for m in pair)
                if ours != theirs:
                    problems.append(
                        f"{where}: {fallback!r} speaks the {theirs} api and this model {ours}: "
                        "a fallback must answer the same calls"
                    )
            chain = [name, fallback]
            while chain[-1] not in chain[:-1]:
                following = self.models.get(chain[-1])
                if following is None or following.on_budget_exhausted is None:
                    break
                chain.append(following.on_budget_exhausted.fallback_model)
            if chain[-1] == name and frozenset(chain) not in cycles:
                cycles.add(frozenset(chain))
                problems.append(f"{where}: a cycle ({' -> '.join(chain)}): a fallback chain must end")
        return problems

    def _quota_problems(self) -> list[str]:
        """Upstream quotas live outside every team's slot (a Cluster cannot check them in the same
        script), and a deployment has one quota, however many targets name it."""
        cluster = (
            ": an upstream quota needs standalone Redis: it is checked in the same script as every team's "
            "limits, and on a Redis Cluster each team lives in its own slot"
        )
        problems = []
        for name, upstream in self.upstreams.items():
            if upstream.limits is not None and self.store.is_cluster:
                problems.append(f"upstreams.{name}.limits{cluster}")
        declared: dict[tuple[str, str], tuple[str, Quota]] = {}
        for name, model in self.models.items():
            for i, target in enumerate(model.targets):
                if target.limits is None:
                    continue
                where = f"models.{name}.targets.{i}.limits"
                if self.store.is_cluster:
                    problems.append(f"{where}{cluster}")
                first = declared.setdefault((target.upstream, target.model), (where, target.limits))
                if first[1] != target.limits:
                    problems.append(
                        f"{where}: {first[0]} gives upstream {target.upstream!r} and model {target.model!r} "
                        "other limits: one deployment has one quota"
                    )
        return problems

    def api_of(self, model: Model) -> str:
        """The API a model's targets speak (`openai` or `anthropic`): it serves that API's endpoints."""
        return self.upstreams[model.targets[0].upstream].api

    def _shared_key_problems(self, environ: Mapping[str, str]) -> list[str]:
        """One key in two entries: the second would authenticate as the first (never printed)."""
        owners: dict[str, str] = {}
        admin = self.admin_sha256(environ)
        if admin is not None:
            owners[admin] = "admin_key_sha256" if self.admin_key_sha256 else "admin_key_env"
        problems = []
        for name, admin_key in self.admin_keys.items():
            digest = admin_key.sha256(environ)
            where = f"admin_keys.{name}"
            if digest is not None and digest in owners:
                problems.append(f"{where}: same key as {owners[digest]}")
            elif digest is not None:
                owners[digest] = where
        for name, key in self.keys.items():
            digest = key.sha256(environ)
            if digest is None:
                continue
            source = next(f for f in ("key_sha256", "key_env", "key") if getattr(key, f) is not None)
            where = f"keys.{name}.{source}"
            if digest in owners:
                problems.append(f"{where}: same key as {owners[digest]}")
            else:
                owners[digest] = where
        return problems


def interpolate_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace `${NAME}` (or `${NAME:-default}`) with the environment's value."""
    env = os.environ if environ is None else environ
    missing = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    result = ENV_VAR_PATTERN.sub(replace, text)
    if missing:
        raise ConfigError([f"${{{name}}}: environment variable is not set" for name in missing])
    return result


def _message(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "greater_than":
        return f"must be > {_bound(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be >= {_bound(ctx['ge'])}"
    if kind == "less_than_equal":
        return f"must be <= {_bound(ctx['le'])}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    if kind == "string_pattern_mismatch":
        return "must be 64 lowercase hex characters (sha256)"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "bool_parsing":
        return "must be true or false"
    return error["msg"].removeprefix("Value error, ")


def _bound(value: Any) -> Any:
    """`0`, not `0.0`, for a number field's whole bound."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_config(data: Any, environ: Mapping[str, str] | None = None) -> Config:
    """The config in `data`; given `environ`, also what it must supply: a value for every
    `key_env` / `admin_key_env` / `api_key_env`, and no key that is also another entry's."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): must be a mapping"])
    try:
        return Config.model_validate(data, context={"environ": environ})
    except ConfigError:
        raise
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            nested = error.get("ctx", {}).get("error")
            if isinstance(nested, ConfigError):
                problems.extend(nested.problems)
            else:
                problems.append(f"{_path(error['loc'])}: {_message(error)}")
        raise ConfigError(problems) from None


def _interpolate_values(value: Any, environ: Mapping[str, str]) -> Any:
    """`${VAR}` in string values only (so comments and keys are never expanded)."""
    if isinstance(value, str):
        return EnvText(interpolate_env(value, environ)) if "${" in value else value
    if isinstance(value, dict):
        return {key: _interpolate_values(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate_values(item, environ) for item in value]
    return value


def load_config_text(text: str, environ: Mapping[str, str] | None = None) -> Config:
    """The config in `text`, checked against `environ` (default: this process's environment)."""
    env = os.environ if environ is None else environ
    try:
        data, repeated = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"(yaml): {exc}"]) from None
    try:
        config = parse_config(_interpolate_values(data, env), env)
    except ConfigError as exc:
        raise ConfigError(repeated + exc.problems) from None
    if repeated:
        raise ConfigError(repeated)
    return config


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    return load_config_text(text, environ)
