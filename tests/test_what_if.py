"""`usage --what-if`: the ledger's tokens re-priced at other prices, beside what was booked."""

from __future__ import annotations

from decimal import Decimal

import pytest

from proxy.config import ConfigError, Price, PriceTier
from proxy.pricing.cost import PricedUsage
from proxy.pricing.what_if import (
    Alternative,
    LedgerModel,
    WhatIfRow,
    catalog_prices,
    ledger_models,
    load_alternatives,
    reprice,
    what_if_table,
)

GPT_4O = LedgerModel("gpt-4o", PricedUsage(input=1_000_000, cached_input=2_000_000, output=500_000), 12_000_000, 40)
SONNET = LedgerModel(
    "sonnet",
    PricedUsage(input=100_000, cached_input=1_000_000, cache_write=200_000, output=50_000, reasoning=10_000),
    2_000_000,
    7,
)
CHEAP = Price(input=Decimal("0.28"), cached_input=Decimal("0.028"), output=Decimal("0.42"))
TIERED = Price(input=Decimal(1), output=Decimal(2), tiers=[PriceTier(above_input_tokens=10, input=Decimal(100))])


@pytest.mark.parametrize(
    ("ledger", "alternatives", "expected"),
    [
        # one alternative maps both models onto one cheap price
        (
            [GPT_4O, SONNET],
            [Alternative("cheap", {"c": CHEAP}, {"gpt-4o": "c", "sonnet": "c"})],
            [
                # 1e6 x 0.28 + 2e6 x 0.028 + 5e5 x 0.42 = 280000 + 56000 + 210000
                WhatIfRow("gpt-4o", GPT_4O.usage, 12_000_000, (546_000,)),
                # 1e5 x .28 + 1e6 x .028 + 2e5 x .28 (cache write defaults to input) + 5e4 x .42 + 1e4 x .42
                WhatIfRow("sonnet", SONNET.usage, 2_000_000, (28_000 + 28_000 + 56_000 + 21_000 + 4_200,)),
                WhatIfRow("total", GPT_4O.usage + SONNET.usage, 14_000_000, (546_000 + 137_200,)),
            ],
        ),
        # unmapped names fall back to the catalog; a name with no price anywhere is None, left out of the total
        (
            [GPT_4O, SONNET],
            [Alternative("list")],
            [
                # the catalog's gpt-4o: 1e6 x 2.50 + 2e6 x 1.25 + 5e5 x 10
                WhatIfRow("gpt-4o", GPT_4O.usage, 12_000_000, (10_000_000,)),
                WhatIfRow("sonnet", SONNET.usage, 2_000_000, (None,)),
                WhatIfRow("total", GPT_4O.usage + SONNET.usage, 14_000_000, (10_000_000,)),
            ],
        ),
        # several alternatives are columns; rows go dearest (as booked) first
        (
            [SONNET, GPT_4O],
            [Alternative("a", {"gpt-4o": CHEAP}), Alternative("b", {"gpt-4o": Price()})],
            [
                WhatIfRow("gpt-4o", GPT_4O.usage, 12_000_000, (546_000, 0)),
                WhatIfRow("sonnet", SONNET.usage, 2_000_000, (None, None)),
                WhatIfRow("total", GPT_4O.usage + SONNET.usage, 14_000_000, (546_000, 0)),
            ],
        ),
        # totals cannot pick a long-context tier: base prices (the documented lower bound)
        (
            [LedgerModel("m", PricedUsage(input=1_000, output=1_000), 5)],
            [Alternative("t", {"m": TIERED})],
            [
                WhatIfRow("m", PricedUsage(input=1_000, output=1_000), 5, (3_000,)),
                WhatIfRow("total", PricedUsage(input=1_000, output=1_000), 5, (3_000,)),
            ],
        ),
        ([], [Alternative("x")], [WhatIfRow("total", PricedUsage(), 0, (0,))]),
    ],
)
def test_reprice(ledger: list[LedgerModel], alternatives: list[Alternative], expected: list[WhatIfRow]) -> None:
    assert reprice(ledger, alternatives, catalog_prices()) == expected


def test_load_alternatives() -> None:
    alternatives = load_alternatives(
        "alternatives:\n"
        "  deepseek:\n"
        "    map: {gpt-4o: deepseek-chat}\n"
        "    prices: {deepseek-chat: {input: '0.2', output: '0.4'}}\n"
        "  list-prices: {}\n"
    )
    assert alternatives == [
        Alternative(
            "deepseek",
            {"deepseek-chat": Price(input=Decimal("0.2"), output=Decimal("0.4"))},
            {"gpt-4o": "deepseek-chat"},
        ),
        Alternative("list-prices", {}, {}),
    ]


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("alternatives:\n  a: {prices: {m: {input: -1}}}\n", ["alternatives.a.prices.m.input: must be >= 0"]),
        ("alternatives:\n  a: {mapping: {}}\n", ["alternatives.a.mapping: unknown field"]),
        ("[1, 2]\n", ["(top level): Input should be a valid dictionary or instance of _PricesFile"]),
        ("a: [\n", None),
    ],
)
def test_a_bad_prices_file_is_refused(text: str, problems: list[str] | None) -> None:
    with pytest.raises(ConfigError) as refused:
        load_alternatives(text)
    if problems is None:
        assert refused.value.problems[0].startswith("(yaml): ")
    else:
        assert refused.value.problems == problems


def test_ledger_models_sum_every_day_team_and_key() -> None:
    def day(model_metrics: dict[str, int]) -> dict:
        key = {"models": {"gpt-4o": model_metrics}}
        return {"date": "x", "teams": {"t1": {"keys": {"k1": key, "k2": key}}, "t2": {"keys": {}}}}

    metrics = {"spend_micros": 10, "requests": 1, "prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 30}
    assert ledger_models([day(metrics), day(metrics)]) == [
        LedgerModel("gpt-4o", PricedUsage(input=280, cached_input=120, output=80), 40, 4)
    ]


def test_table() -> None:
    rows = reprice([GPT_4O], [Alternative("cheap", {"gpt-4o": CHEAP})])
    lines = [" ".join(line.split()) for line in what_if_table(rows, [Alternative("cheap")], "2026-11").splitlines()]
    assert lines == [
        "what if, 2026-11 (USD; tokens as booked; '-': no price for that model)",
        "model input cached_input cache_write output reasoning today cheap",
        "gpt-4o 1000000 2000000 0 500000 0 12.000000 0.546000",
        "total 1000000 2000000 0 500000 0 12.000000 0.546000",
    ]
