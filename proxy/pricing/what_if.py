"""`llm-proxy usage --what-if PRICES.yaml`: the ledger's tokens re-priced at other prices.

Pure: the caller supplies the ledger's per-model token totals and what they were booked at; each
alternative prices every model at its own price for it (after an optional model mapping: "our
gpt-4o traffic, on deepseek-chat"). PRICES.yaml::

    alternatives:
      deepseek:                                  # a column of the comparison
        map: {gpt-4o: deepseek-chat}             # ledger model -> the price name to use (optional)
        prices:                                  # price name -> price_per_mtok (optional)
          deepseek-chat: {input: "0.28", cached_input: "0.028", output: "0.42"}
      list-prices: {}                            # a name not in `prices` is looked up in the catalog

Bound: the ledger keeps totals per model, not each request's prompt size, so long-context tiers
cannot be chosen: totals are priced at the base (untiered) prices, a lower bound for traffic that
would cross a tier. Each total is rounded once (the ledger rounds once per request), so the
re-priced figure and a per-request one differ by under half a micro-dollar per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import Price, _message, _path
from ..errors import ConfigError
from ..limits.types import Usage
from .catalog import catalog
from .cost import PricedUsage, cost_micros, micros_to_usd


@dataclass(frozen=True, slots=True)
class LedgerModel:
    """One model's totals over the period, and what the ledger booked for them."""

    model: str
    usage: PricedUsage
    spend_micros: int
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Alternative:
    name: str
    prices: Mapping[str, Price] = field(default_factory=dict)
    mapping: Mapping[str, str] = field(default_factory=dict)  # ledger model -> price name


@dataclass(frozen=True, slots=True)
class WhatIfRow:
    """`costs[i]` is alternative i's cost in micro-dollars, or None when it has no price for the model."""

    model: str
    usage: PricedUsage
    today_micros: int
    costs: tuple[int | None, ...]


def catalog_prices() -> dict[str, Price]:
    return {name: Price(**entry.price_per_mtok) for name, entry in catalog().items()}


def _total_cost(price: Price, usage: PricedUsage) -> int:
    return cost_micros(price.model_copy(update={"tiers": []}), usage)


def reprice(
    ledger: Iterable[LedgerModel], alternatives: Sequence[Alternative], fallback: Mapping[str, Price] | None = None
) -> list[WhatIfRow]:
    """One row per ledger model (sorted by today's cost, dearest first), then a "total" row.

    A price name an alternative does not define is looked up in `fallback` (the catalog, when
    the CLI calls). A total leaves out models an alternative cannot price: see that row's None.
    """
    prices_elsewhere = fallback or {}
    rows = []
    for line in sorted(ledger, key=lambda line: (-line.spend_micros, line.model)):
        costs: list[int | None] = []
        for alternative in alternatives:
            name = alternative.mapping.get(line.model, line.model)
            price = alternative.prices[name] if name in alternative.prices else prices_elsewhere.get(name)
            costs.append(None if price is None else _total_cost(price, line.usage))
        rows.append(WhatIfRow(line.model, line.usage, line.spend_micros, tuple(costs)))
    total_usage = sum((row.usage for row in rows), PricedUsage())
    totals = tuple(sum(row.costs[i] or 0 for row in rows) for i in range(len(alternatives)))
    rows.append(WhatIfRow("total", total_usage, sum(row.today_micros for row in rows), totals))
    return rows


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _AlternativeFile(_Strict):
    map: dict[str, str] = {}
    prices: dict[str, Price] = {}


class _PricesFile(_Strict):
    alternatives: dict[str, _AlternativeFile]


def load_alternatives(text: str) -> list[Alternative]:
    """The alternatives of a PRICES.yaml, in file order; ConfigError names every problem."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"(yaml): {exc}"]) from None
    try:
        parsed = _PricesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{_path(error['loc'])}: {_message(error)}" for error in exc.errors()]) from None
    return [Alternative(name, dict(alt.prices), dict(alt.map)) for name, alt in parsed.alternatives.items()]


def ledger_models(reports: Iterable[Mapping[str, Any]]) -> list[LedgerModel]:
    """Per-model totals summed over `usage()` reports (one per day; every team and key).

    A day booked before the ledger kept cache writes and reasoning tokens reads them as 0.
    """
    totals: dict[str, list[int]] = {}
    for report in reports:
        for team in report["teams"].values():
            for key in team.get("keys", {}).values():
                for model, metrics in key.get("models", {}).items():
                    line = totals.setdefault(model, [0] * len(LEDGER_COUNTS))
                    for i, metric in enumerate(LEDGER_COUNTS):
                        line[i] += metrics.get(metric, 0)
    return [
        LedgerModel(
            model, PricedUsage.from_usage(Usage(prompt, completion, cached, written, reasoning)), spend, requests
        )
        for model, (prompt, completion, cached, written, reasoning, spend, requests) in totals.items()
    ]


LEDGER_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "spend_micros",
    "requests",
)


def _usd(micros: int | None) -> str:
    return "-" if micros is None else str(micros_to_usd(micros))


def what_if_table(rows: Sequence[WhatIfRow], alternatives: Sequence[Alternative], period: str) -> str:
    header = [
        "model",
        "input",
        "cached_input",
        "cache_write",
        "output",
        "reasoning",
        "today",
        *(alternative.name for alternative in alternatives),
    ]
    body = [
        [
            row.model,
            *(str(getattr(row.usage, name)) for name in header[1:6]),
            _usd(row.today_micros),
            *(_usd(cost) for cost in row.costs),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [f"what if, {period} (USD; tokens as booked; '-': no price for that model)"]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    return "\n".join(lines)
