"""The price catalog shipped in the package (`proxy/pricing/catalog.yaml`): public list prices.

Read once per process. Entries are plain data here (this module must not import `proxy.config`,
which resolves `price: catalog` through `catalog_price_fields`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

CATALOG_RESOURCE = "pricing/catalog.yaml"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    provider: str
    taken: str  # YYYY-MM-DD: the day the price was read
    source: str  # the page it was read from
    price_per_mtok: dict[str, Any]  # as a model's `price_per_mtok` in the config


@cache
def catalog() -> dict[str, CatalogEntry]:
    """Every catalog entry by name, in file order."""
    text = resources.files("proxy").joinpath(CATALOG_RESOURCE).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return {
        name: CatalogEntry(
            name=name,
            provider=str(entry["provider"]),
            taken=str(entry["taken"]),
            source=str(entry["source"]),
            price_per_mtok=dict(entry["price_per_mtok"]),
        )
        for name, entry in data["models"].items()
    }


def catalog_price_fields(name: str) -> dict[str, Any] | None:
    """The `price_per_mtok` mapping of the entry `name` (a fresh copy), or None."""
    entry = catalog().get(name)
    return None if entry is None else copy.deepcopy(entry.price_per_mtok)


PRICE_COLUMNS = ("input", "cached_input", "cache_write", "output", "reasoning")


def catalog_listing() -> list[dict[str, Any]]:
    """The catalog as JSON-ready rows (prices as decimal strings, as written in the file)."""
    return [
        {
            "model": entry.name,
            "provider": entry.provider,
            "taken": entry.taken,
            "source": entry.source,
            "price_per_mtok": entry.price_per_mtok,
        }
        for entry in catalog().values()
    ]


def catalog_table() -> str:
    """The catalog as a text table; a long-context tier is one more line under its model."""
    header = ("model", "provider", *PRICE_COLUMNS, "taken")
    rows: list[tuple[str, ...]] = [header]
    for entry in catalog().values():
        price = entry.price_per_mtok
        rows.append((entry.name, entry.provider, *(str(price.get(name, "-")) for name in PRICE_COLUMNS), entry.taken))
        for tier in price.get("tiers", []):
            rows.append(
                (
                    f"  prompt > {tier['above_input_tokens']}",
                    "",
                    *(str(tier.get(name, "=")) for name in PRICE_COLUMNS),
                    "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    legend = (
        "USD per million tokens; '-' = the default (cached_input, cache_write: input; reasoning: output), "
        "'=' = as the model's line. Dates and sources: --json."
    )
    return "\n".join([*lines, "", legend])
