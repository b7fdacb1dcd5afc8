from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import Price, PriceTier
from proxy.limits.types import Usage
from proxy.pricing.cost import (
    PricedUsage,
    cached_input_price,
    cost_micros,
    format_usd,
    micros_to_usd,
    rates_for,
    reservation_micros,
    usd_to_micros,
)

DEEPSEEK_CHAT = Price(input=Decimal("0.27"), output=Decimal("1.10"), cached_input=Decimal("0.07"))
GPT_4O_MINI = Price(input=Decimal("0.15"), output=Decimal("0.60"), cached_input=Decimal("0.075"))
NO_CACHE_PRICE = Price(input=Decimal("2.50"), output=Decimal("10.00"))
FREE = Price()


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        (DEEPSEEK_CHAT, Usage(0, 0, 0), 0),
        (DEEPSEEK_CHAT, Usage(1_000_000, 0, 0), 270_000),
        (DEEPSEEK_CHAT, Usage(0, 1_000_000, 0), 1_100_000),
        (DEEPSEEK_CHAT, Usage(1_000_000, 0, 1_000_000), 70_000),
        (DEEPSEEK_CHAT, Usage(1000, 500, 200), 780),  # 800 x 0.27 + 200 x 0.07 + 500 x 1.10
        (DEEPSEEK_CHAT, Usage(1, 0, 0), 0),  # 0.27 rounds down
        (DEEPSEEK_CHAT, Usage(2, 0, 0), 1),  # 0.54 rounds up
        (GPT_4O_MINI, Usage(10, 0, 0), 2),  # exactly 1.5: half up
        (GPT_4O_MINI, Usage(10, 0, 10), 1),  # 0.75
        (GPT_4O_MINI, Usage(1, 1, 1), 1),  # 0.075 + 0.6 = 0.675: one rounding, not two
        (NO_CACHE_PRICE, Usage(100, 0, 100), 250),  # cached_input None: cached at input price
        (NO_CACHE_PRICE, Usage(3, 7, 0), 78),  # 7.5 + 70 = 77.5 -> 78
        (FREE, Usage(10**9, 10**9, 5), 0),
        (DEEPSEEK_CHAT, Usage(10, 0, 50), 1),  # cached > prompt: read as all cached (0.7)
        (DEEPSEEK_CHAT, Usage(-5, -5, -5), 0),
        (Price(input=Decimal("0.000001")), Usage(10**12, 0, 0), 1_000_000),
        (Price(input=Decimal("1234.5")), Usage(10**15, 0, 0), 1_234_500_000_000_000_000),
    ],
)
def test_cost_micros(price: Price, usage: Usage, expected: int) -> None:
    assert cost_micros(price, usage) == expected
    assert isinstance(cost_micros(price, usage), int)


@pytest.mark.parametrize(
    ("price", "prompt", "max_output", "expected"),
    [
        (DEEPSEEK_CHAT, 0, 0, 0),
        (DEEPSEEK_CHAT, 1, 0, 1),  # 0.27 rounds up
        (DEEPSEEK_CHAT, 1000, 500, 820),  # 270 + 550
        (DEEPSEEK_CHAT, 3, 1, 2),  # 0.81 + 1.1 = 1.91
        (GPT_4O_MINI, 10, 0, 2),
        (NO_CACHE_PRICE, 1, 1, 13),  # 12.5
        (FREE, 10**6, 10**6, 0),
        (Price(input=Decimal(1), cached_input=Decimal(3)), 10, 0, 30),  # the dearer prompt price
        (DEEPSEEK_CHAT, -1, -1, 0),
    ],
)
def test_reservation_micros(price: Price, prompt: int, max_output: int, expected: int) -> None:
    assert reservation_micros(price, prompt, max_output) == expected


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        (Decimal(0), 0),
        (Decimal(1), 1_000_000),
        (Decimal("10.5"), 10_500_000),
        (Decimal("0.000001"), 1),
        (Decimal("0.0000005"), 1),  # half up
        (Decimal("0.00000049"), 0),
        (Decimal("12345678.123456"), 12_345_678_123_456),
    ],
)
def test_usd_to_micros(usd: Decimal, micros: int) -> None:
    assert usd_to_micros(usd) == micros


@pytest.mark.parametrize(
    ("micros", "usd", "text"),
    [
        (0, Decimal("0.000000"), "$0.000000"),
        (1, Decimal("0.000001"), "$0.000001"),
        (1_234_567, Decimal("1.234567"), "$1.234567"),
        (10_500_000, Decimal("10.5"), "$10.500000"),
        (-500_000, Decimal("-0.5"), "-$0.500000"),
        (10**18, Decimal(10**12), "$1000000000000.000000"),
    ],
)
def test_micros_to_usd_and_format(micros: int, usd: Decimal, text: str) -> None:
    assert micros_to_usd(micros) == usd
    assert format_usd(micros) == text
    assert usd_to_micros(micros_to_usd(micros)) == micros


# --- properties ---------------------------------------------------------------------------------

price_values = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
prices = st.builds(Price, input=price_values, output=price_values, cached_input=st.none() | price_values)
token_counts = st.integers(min_value=0, max_value=10**9)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    prompt = draw(token_counts)
    cached = draw(st.integers(min_value=0, max_value=prompt))
    return Usage(prompt_tokens=prompt, completion_tokens=draw(token_counts), cached_tokens=cached)


def _round_half_up(value: Fraction) -> int:
    return int((value + Fraction(1, 2)) // 1)


@given(prices, usages())
def test_cost_matches_exact_rational_arithmetic(price: Price, usage: Usage) -> None:
    exact = (
        Fraction(price.input) * (usage.prompt_tokens - usage.cached_tokens)
        + Fraction(cached_input_price(price)) * usage.cached_tokens
        + Fraction(price.output) * usage.completion_tokens
    )
    assert cost_micros(price, usage) == _round_half_up(exact)


@given(prices, usages())
def test_cost_of_parts_sums_to_the_whole_within_one_rounding(price: Price, usage: Usage) -> None:
    uncached = Usage(prompt_tokens=usage.prompt_tokens - usage.cached_tokens)
    cached = Usage(prompt_tokens=usage.cached_tokens, cached_tokens=usage.cached_tokens)
    output = Usage(completion_tokens=usage.completion_tokens)
    parts = cost_micros(price, uncached) + cost_micros(price, cached) + cost_micros(price, output)
    assert abs(cost_micros(price, usage) - parts) <= 1


@given(prices, usages())
def test_cost_is_non_negative(price: Price, usage: Usage) -> None:
    assert cost_micros(price, usage) >= 0


@given(prices, usages(), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_cost_is_monotone_in_tokens(
    price: Price, usage: Usage, more_prompt: int, more_output: int, more_cached: int
) -> None:
    bigger = Usage(
        prompt_tokens=usage.prompt_tokens + more_prompt + more_cached,
        completion_tokens=usage.completion_tokens + more_output,
        cached_tokens=usage.cached_tokens + more_cached,
    )
    assert cost_micros(price, bigger) >= cost_micros(price, usage)


@given(prices, usages(), st.data())
def test_reservation_covers_any_usage_within_its_tokens(price: Price, reserved: Usage, data: st.DataObject) -> None:
    prompt = data.draw(st.integers(0, reserved.prompt_tokens))
    actual = Usage(
        prompt_tokens=prompt,
        completion_tokens=data.draw(st.integers(0, reserved.completion_tokens)),
        cached_tokens=data.draw(st.integers(0, prompt)),
    )
    reservation = reservation_micros(price, reserved.prompt_tokens, reserved.completion_tokens)
    assert reservation >= cost_micros(price, actual)
    assert reservation >= cost_micros(price, Usage(reserved.prompt_tokens, reserved.completion_tokens))


@given(st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False, allow_infinity=False))
def test_usd_round_trips_at_micro_precision(usd: Decimal) -> None:
    assert micros_to_usd(usd_to_micros(usd)) == usd


@settings(max_examples=10, deadline=None)
@given(prices, st.lists(usages(), min_size=1, max_size=7))
def test_a_million_request_costs_sum_exactly(price: Price, pattern: list[Usage]) -> None:
    requests = 10**6
    costs = [cost_micros(price, usage) for usage in pattern]
    total = 0
    for i in range(requests):
        total += costs[i % len(costs)]
    full_cycles, rest = divmod(requests, len(costs))
    assert total == full_cycles * sum(costs) + sum(costs[:rest])
    assert micros_to_usd(total) == full_cycles * sum(map(micros_to_usd, costs)) + sum(
        map(micros_to_usd, costs[:rest]), Decimal(0)
    )


# --- every priced token class, long-context tiers (issue 13) --------------------------------------


SONNET = Price(
    input=Decimal(3),
    output=Decimal(15),
    cached_input=Decimal("0.30"),
    cache_write=Decimal("3.75"),
    tiers=[
        PriceTier(
            above_input_tokens=200_000,
            input=Decimal(6),
            output=Decimal("22.50"),
            cached_input=Decimal("0.60"),
            cache_write=Decimal("7.50"),
        )
    ],
)
O3 = Price(input=Decimal(2), output=Decimal(8), cached_input=Decimal("0.50"))
REASONING_PRICED = Price(input=Decimal(1), output=Decimal(2), reasoning=Decimal(5))
TWO_TIERS = Price(
    input=Decimal(1),
    output=Decimal(2),
    tiers=[
        PriceTier(above_input_tokens=100, input=Decimal(10)),
        PriceTier(above_input_tokens=1000, output=Decimal(40)),
    ],
)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # prompt, completion, cached, reasoning -> input, cached_input, cache_write, output, reasoning
        ((1000, 500, 200, 300), PricedUsage(800, 200, 0, 200, 300)),
        ((1000, 500, 0, 500), PricedUsage(1000, 0, 0, 0, 500)),  # all reasoning
        ((10, 5, 50, 90), PricedUsage(0, 10, 0, 0, 5)),  # parts larger than their totals: all of it
        ((-1, -1, -1, -1), PricedUsage()),
    ],
)
def test_openai_counts_take_reasoning_out_of_completion_once(
    counts: tuple[int, int, int, int], expected: PricedUsage
) -> None:
    prompt, completion, cached, reasoning = counts
    assert PricedUsage.from_usage(Usage(prompt, completion, cached, reasoning_tokens=reasoning)) == expected


def test_cache_reads_and_writes_come_out_of_the_prompt() -> None:
    usage = PricedUsage.from_usage(Usage(12_050, 400, cached_tokens=10_000, cache_write_tokens=2_000))
    assert usage == PricedUsage(input=50, cached_input=10_000, cache_write=2_000, output=400)
    assert usage.prompt_tokens == 12_050


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        # Anthropic: 50 x 3 + 10000 x 0.30 + 2000 x 3.75 + 400 x 15 = 150 + 3000 + 7500 + 6000
        (SONNET, PricedUsage(50, 10_000, 2_000, 400, 0), 16_650),
        # cache_write defaults to input: 2000 x 2
        (O3, PricedUsage(cache_write=2_000), 4_000),
        # reasoning defaults to output: (200 + 300) x 8, never more (OpenAI counts it inside completion)
        (O3, PricedUsage.from_usage(Usage(0, 500, reasoning_tokens=300)), 4_000),
        (REASONING_PRICED, PricedUsage(output=10, reasoning=10), 70),  # 10 x 2 + 10 x 5
        # the tier: prompt 200000 is not above 200000; 200001 is, and every token is at tier prices
        (SONNET, PricedUsage(input=200_000, output=1_000), 615_000),
        (SONNET, PricedUsage(input=200_001, output=1_000), 1_222_506),  # 200001 x 6 + 1000 x 22.5
        # cache reads and writes count towards the threshold
        (SONNET, PricedUsage(input=1, cached_input=100_000, cache_write=100_000), 810_006),
        # a tier overrides a subset: above 100, input 10 (cached/cache write follow the tier's input)
        (TWO_TIERS, PricedUsage(input=50, cached_input=51, output=1), 1012),
        # above 1000 both tiers apply, the higher last: input 10 from the first, output 40
        (TWO_TIERS, PricedUsage(input=1001, output=1), 10_050),
        (TWO_TIERS, PricedUsage(input=100, output=1), 102),  # not above the first threshold
        # one rounding over every class: 0.60 + 7.50 = 8.10 -> 8 (rounded apart: 1 + 8 = 9)
        (SONNET, PricedUsage(cached_input=2, cache_write=2), 8),
    ],
)
def test_cost_prices_every_token_class(price: Price, usage: PricedUsage, expected: int) -> None:
    assert cost_micros(price, usage) == expected


@pytest.mark.parametrize(
    ("price", "prompt", "max_output", "expected"),
    [
        (SONNET, 1000, 100, 5_250),  # prompt at the dearest of 3 / 0.30 / 3.75, output at 15
        (SONNET, 200_001, 0, 1_500_008),  # the tier for the estimate: 200001 x 7.50 = 1500007.5 -> up
        (REASONING_PRICED, 0, 3, 15),  # output at the dearer of output and reasoning
        (O3, 1, 1, 10),
    ],
)
def test_reservation_is_the_worst_case_of_the_estimate(
    price: Price, prompt: int, max_output: int, expected: int
) -> None:
    assert reservation_micros(price, prompt, max_output) == expected


def test_default_prices_follow_the_tier_not_the_base() -> None:
    rates = rates_for(TWO_TIERS, 101)
    assert (rates.input, rates.cached_input, rates.cache_write, rates.output, rates.reasoning) == (
        Decimal(10),
        Decimal(10),
        Decimal(10),
        Decimal(2),
        Decimal(2),
    )


tier_prices = st.builds(
    Price,
    input=price_values,
    output=price_values,
    cached_input=st.none() | price_values,
    cache_write=st.none() | price_values,
    reasoning=st.none() | price_values,
    tiers=st.lists(
        st.builds(
            PriceTier,
            above_input_tokens=st.integers(1, 10**6),
            input=st.none() | price_values,
            output=st.none() | price_values,
            cached_input=st.none() | price_values,
            cache_write=st.none() | price_values,
            reasoning=st.none() | price_values,
        ),
        max_size=3,
        unique_by=lambda tier: tier.above_input_tokens,
    ).map(lambda tiers: sorted(tiers, key=lambda tier: tier.above_input_tokens)),
)
small_counts = st.integers(min_value=0, max_value=2 * 10**6)
priced_usages = st.builds(PricedUsage, small_counts, small_counts, small_counts, small_counts, small_counts)


@given(tier_prices, priced_usages)
def test_reservation_covers_every_usage_of_the_same_prompt_and_output(price: Price, usage: PricedUsage) -> None:
    reserved = reservation_micros(price, usage.prompt_tokens, usage.output + usage.reasoning)
    assert reserved >= cost_micros(price, usage)


@given(tier_prices, priced_usages)
def test_tiered_cost_matches_exact_rational_arithmetic(price: Price, usage: PricedUsage) -> None:
    chosen: dict[str, Decimal | None] = {
        name: getattr(price, name) for name in ("input", "output", "cached_input", "cache_write", "reasoning")
    }
    for tier in price.tiers:
        if usage.prompt_tokens > tier.above_input_tokens:
            chosen.update({k: v for k in chosen if (v := getattr(tier, k)) is not None})
    base_in, base_out = Fraction(chosen["input"]), Fraction(chosen["output"])

    def rate(name: str, fallback: Fraction) -> Fraction:
        value = chosen[name]
        return fallback if value is None else Fraction(value)

    exact = (
        base_in * usage.input
        + rate("cached_input", base_in) * usage.cached_input
        + rate("cache_write", base_in) * usage.cache_write
        + base_out * usage.output
        + rate("reasoning", base_out) * usage.reasoning
    )
    assert cost_micros(price, usage) == _round_half_up(exact)


def test_a_copy_of_a_price_is_priced_as_itself_and_leaves_the_original_alone() -> None:
    """The rates worked out once per price are kept with that price: a copy without its tiers (as the
    what-if does) shares the original's memo, yet each is priced by its own prices."""
    tiered = Price(input=Decimal(1), output=Decimal(1), tiers=[PriceTier(above_input_tokens=100, input=Decimal(100))])
    usage = PricedUsage(input=1000)
    assert cost_micros(tiered, usage) == 100_000
    flat = tiered.model_copy(update={"tiers": []})
    assert cost_micros(flat, usage) == 1_000
    assert cost_micros(tiered, usage) == 100_000
    assert rates_for(tiered, -5) == rates_for(tiered, 0)  # a negative count reads as no prompt
