"""The price catalog shipped in the package (`proxy/prices/catalog.yaml`): public list prices.

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

CATALOG_RESOURCE = "prices/catalog.yaml"


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
        name: CatalogEntry(name=name, provider=str(entry["provider"]), taken=str(entry["taken"]),
                           source=str(entry["source"]), price_per_mtok=dict(entry["price_per_mtok"]))
        for name, entry in data["models"].items()
    }


def catalog_price_fields(name: str) -> dict[str, Any] | None:
    """The `price_per_mtok` mapping of the entry `name` (a fresh copy), or None."""
    entry = catalog().get(name)
    return None if entry is None else copy.deepcopy(entry.price_per_mtok)
