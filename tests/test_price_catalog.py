"""The shipped price catalog: every entry a valid dated price with a source; a model may name an
entry (`price: catalog` / `price: {catalog: NAME}`) with overrides; `llm-proxy prices` lists it and
`check-config` warns about a model whose spend would read $0."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.config import ConfigError, Price, parse_config
from proxy.pricing.catalog import CATALOG_RESOURCE, catalog
from proxy.pricing.cost import PricedUsage, cost_micros

ROOT = Path(__file__).parent.parent
UPSTREAMS = {"mock": {"base_url": "http://127.0.0.1:9/v1"}}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ),
    )


def _model(**fields: object) -> dict[str, object]:
    return {"targets": [{"upstream": "mock", "model": fields.pop("target", "m")}], **fields}


def _price(model: dict[str, object]) -> Price:
    return parse_config({"upstreams": UPSTREAMS, "models": {"m": model}}).models["m"].price_per_mtok


def test_every_entry_is_a_dated_sourced_valid_price() -> None:
    entries = catalog()
    assert {
        "deepseek-chat",
        "deepseek-reasoner",
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o3",
        "o4-mini",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "claude-opus-4-1",
        "claude-3-5-haiku-latest",
    } <= set(entries)
    for name, entry in entries.items():
        price = Price(**entry.price_per_mtok)
        assert price.input > 0 and price.output > 0, name
        assert date.fromisoformat(entry.taken) <= date(2026, 12, 31), name
        assert entry.source and entry.provider in ("deepseek", "openai", "anthropic"), name
        assert all(isinstance(value, str) for key, value in entry.price_per_mtok.items() if key != "tiers"), name


def test_the_catalog_ships_in_the_package() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["proxy"]
    assert any(fnmatch.fnmatch(CATALOG_RESOURCE, pattern) for pattern in package_data)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # by the first target's model name
        (
            _model(target="gpt-4o-mini", price="catalog"),
            Price(input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60")),
        ),
        # by name, whatever the target is called
        (
            _model(target="my-deployment", price={"catalog": "gpt-4o-mini"}),
            Price(input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.60")),
        ),
        # config fields override the catalog's, the rest stay
        (
            _model(target="gpt-4o-mini", price="catalog", price_per_mtok={"output": "0.5", "reasoning": "1"}),
            Price(input=Decimal("0.15"), cached_input=Decimal("0.075"), output=Decimal("0.5"), reasoning=Decimal(1)),
        ),
        # no price at all: zero (check-config warns)
        (_model(), Price()),
    ],
)
def test_a_model_takes_its_price_from_the_catalog(model: dict[str, object], expected: Price) -> None:
    assert _price(model) == expected


def test_catalog_tiers_apply_and_an_override_replaces_them() -> None:
    sonnet = _price(_model(target="claude-sonnet-4-5", price="catalog"))
    long_prompt = PricedUsage(input=1_000, cache_write=200_000, output=1_000)  # 201000 prompt tokens
    assert cost_micros(sonnet, long_prompt) == 1_000 * 6 + 200_000 * 7.5 + 1_000 * 22.5
    flat = _price(_model(target="claude-sonnet-4-5", price="catalog", price_per_mtok={"tiers": []}))
    assert cost_micros(flat, long_prompt) == 1_000 * 3 + 200_000 * 3.75 + 1_000 * 15


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (
            _model(target="gpt-99", price="catalog"),
            "models.m.price: no catalog price for 'gpt-99' (`llm-proxy prices` lists the catalog)",
        ),
        (
            _model(price={"catalog": "nope"}),
            "models.m.price: no catalog price for 'nope' (`llm-proxy prices` lists the catalog)",
        ),
        (_model(price="list"), "models.m.price: must be `catalog` or {catalog: NAME}"),
        (_model(price={"catalog": "gpt-4o", "extra": 1}), "models.m.price: must be `catalog` or {catalog: NAME}"),
        (
            _model(target="gpt-4o", price="catalog", price_per_mtok={"input": -1}),
            "models.m.price_per_mtok.input: must be >= 0",
        ),
        (
            _model(price_per_mtok={"tiers": [{"above_input_tokens": 5, "input": 1}, {"above_input_tokens": 5}]}),
            "models.m.price_per_mtok.tiers: above_input_tokens must increase from one tier to the next",
        ),
        (
            _model(price_per_mtok={"tiers": [{"above_input_tokens": 0}]}),
            "models.m.price_per_mtok.tiers.0.above_input_tokens: must be > 0",
        ),
    ],
)
def test_a_bad_price_is_refused_in_our_words(model: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _price(model)
    assert refused.value.problems == [problem]


def test_prices_lists_the_catalog() -> None:
    table = run_cli("prices")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "model",
        "provider",
        "input",
        "cached_input",
        "cache_write",
        "output",
        "reasoning",
        "taken",
    ]
    assert "gpt-4o-mini openai 0.15 0.075 - 0.60 - 2026-12-01" in [" ".join(line.split()) for line in lines]
    assert "prompt > 200000 6 0.60 7.50 22.50 =" in [" ".join(line.split()) for line in lines]
    listing = json.loads(run_cli("prices", "--json").stdout)
    assert [row["model"] for row in listing] == list(catalog())
    assert {"model", "provider", "taken", "source", "price_per_mtok"} == set(listing[0])


def test_check_config_warns_about_a_model_without_a_price(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "upstreams:\n  mock: {base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n"
        "  free: {targets: [{upstream: mock, model: free}]}\n"
        "  priced: {targets: [{upstream: mock, model: p}], price_per_mtok: {input: 1}}\n"
        "  local: {targets: [{upstream: mock, model: l}], price_per_mtok: {input: 0}}\n"
        "  listed: {targets: [{upstream: mock, model: gpt-4o}], price: catalog}\n",
        encoding="utf-8",
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "warning: models.free: no price (price_per_mtok or price: catalog): its spend would read $0"
    ]
