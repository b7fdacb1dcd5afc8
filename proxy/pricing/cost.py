"""Request cost in integer micro-dollars: exact Decimal arithmetic, one rounding per request.

Prices are USD per million tokens, so `price_per_mtok * tokens` is already the cost in
micro-dollars: no scaling, no float. Costs are rounded once per request (ROUND_HALF_UP) and then
only ever added as ints, so a day's spend is the exact sum of its requests.

Reservation and settlement go through the one function `_exact_cost` (integer arithmetic on the
prices scaled to integers once per config: `Rates.units`, `PriceTable`): settlement with the
request's real token counts, reservation with the worst case it may produce (every prompt token
at the dearest prompt price of its tier, every output token at the dearest output price, rounded
up with ROUND_CEILING), so a reservation never under-reserves for the token counts it assumed.

Token classes (`PricedUsage`) are disjoint, each priced at the price of the same name:

    input         prompt tokens neither read from nor written to a cache      price.input
    cached_input  cache reads (OpenAI cached_tokens, DeepSeek prompt_cache_hit_tokens,
                  Anthropic cache_read_input_tokens)                          price.cached_input
    cache_write   Anthropic cache_creation_input_tokens                       price.cache_write
    output        completion tokens that are not reasoning tokens             price.output
    reasoning     reasoning tokens (OpenAI counts them inside
                  completion_tokens: `from_usage` takes them out once)       price.reasoning

A tier (`price.tiers`, "above_input_tokens") applies to the whole request when its prompt
(input + cached_input + cache_write) exceeds the threshold; the highest such tier wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, ROUND_HALF_UP, Context, Decimal
from typing import cast

from proxy.config import Price
from proxy.limits.types import Usage

MICROS_PER_USD = 1_000_000

# Additions and multiplications of finite Decimals are exact in this context (never rounded).
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
_ONE = Decimal(1)
_MICRO = Decimal("0.000001")


@dataclass(frozen=True, slots=True)
class PricedUsage:
    """One request's tokens by price class; the classes are disjoint (see the module docstring)."""

    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Every prompt token, cached or not: what selects a long-context tier."""
        return max(self.input, 0) + max(self.cached_input, 0) + max(self.cache_write, 0)

    @classmethod
    def from_usage(cls, usage: Usage) -> PricedUsage:
        """The project's `Usage`: cached and cache-write tokens within the prompt, reasoning
        within the completion; each class is taken out of its total once (a part larger than
        what is left of its total is read as all of it; negatives are 0)."""
        prompt, completion = max(usage.prompt_tokens, 0), max(usage.completion_tokens, 0)
        cached = min(max(usage.cached_tokens, 0), prompt)
        written = min(max(usage.cache_write_tokens, 0), prompt - cached)
        reasoning = min(max(usage.reasoning_tokens, 0), completion)
        return cls(
            input=prompt - cached - written,
            cached_input=cached,
            cache_write=written,
            output=completion - reasoning,
            reasoning=reasoning,
        )

    def __add__(self, other: PricedUsage) -> PricedUsage:
        return PricedUsage(
            self.input + other.input,
            self.cached_input + other.cached_input,
            self.cache_write + other.cache_write,
            self.output + other.output,
            self.reasoning + other.reasoning,
        )


@dataclass(frozen=True, slots=True)
class Rates:
    """The five per-class prices in force for one request (its tier chosen, defaults applied).

    `units` are the same five prices as integers over `scale` (a power of ten): a configured
    price is a finite decimal, so `tokens * units` summed is the exact cost in 1/`scale`
    micro-dollars, in integer arithmetic."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    output: Decimal
    reasoning: Decimal
    scale: int = field(init=False, repr=False, compare=False)
    units: tuple[int, int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prices = (self.input, self.cached_input, self.cache_write, self.output, self.reasoning)
        places = max(0, *(-_exponent(price) for price in prices))
        units = tuple(int(price.scaleb(places, context=_EXACT)) for price in prices)
        object.__setattr__(self, "scale", 10**places)
        object.__setattr__(self, "units", units)

    def worst(self) -> Rates:
        """Every prompt class at the dearest prompt price, every output class at the dearest output
        price: what a reservation assumes."""
        prompt_price = max(self.input, self.cached_input, self.cache_write)
        output_price = max(self.output, self.reasoning)
        return Rates(prompt_price, prompt_price, prompt_price, output_price, output_price)


def _exponent(price: Decimal) -> int:
    exponent = price.as_tuple().exponent
    if not isinstance(exponent, int):  # NaN or infinity: the config refuses them
        raise ValueError(f"a price must be a finite number, not {price}")
    return exponent


@dataclass(frozen=True, slots=True)
class PriceTable:
    """A model's rates for each tier, and the reservation's worst case of each, built once per
    config (`price_table`): `(above_input_tokens, rates, worst)`, highest threshold first, the
    base prices last (threshold -1)."""

    tiers: tuple[tuple[int, Rates, Rates], ...]

    @classmethod
    def of(cls, price: Price) -> PriceTable:
        thresholds = [-1, *(tier.above_input_tokens for tier in price.tiers)]
        rated = [(t, _rates_for_prompt(price, t + 1)) for t in thresholds]  # a prompt just above each
        return cls(tuple((t, rates, rates.worst()) for t, rates in reversed(rated)))

    def rates(self, prompt_tokens: int) -> tuple[Rates, Rates]:
        """The rates for a request with `prompt_tokens` prompt tokens, and their worst case."""
        for threshold, rates, worst in self.tiers:
            if prompt_tokens > threshold:
                return rates, worst
        return self.tiers[-1][1], self.tiers[-1][2]  # the base prices (a negative count reads as 0)


def price_table(price: Price) -> PriceTable:
    """`price`'s table, worked out on first use and kept with the price (`Price.memo`)."""
    kept = price.memo.get("table")
    # kept with the price it was built from: a copy of a price (`model_copy`) shares its memo, and
    # may differ from it (a copy without tiers), so it builds its own
    if isinstance(kept, tuple) and kept[0] is price:
        return cast(PriceTable, kept[1])
    table = PriceTable.of(price)
    price.memo["table"] = (price, table)
    return table


def rates_for(price: Price, prompt_tokens: int) -> Rates:
    """The prices for a request with `prompt_tokens` prompt tokens.

    The highest tier whose `above_input_tokens` the prompt exceeds overrides the prices it names;
    then `cached_input` and `cache_write` default to `input`, `reasoning` to `output`.
    """
    return price_table(price).rates(prompt_tokens)[0]


def _rates_for_prompt(price: Price, prompt_tokens: int) -> Rates:
    """`rates_for`, worked out from the configured prices (once per config, by `PriceTable.of`)."""
    input_price, output_price = price.input, price.output
    cached, written, reasoning = price.cached_input, price.cache_write, price.reasoning
    for tier in price.tiers:  # ascending thresholds (validated); each names the prices it overrides
        if prompt_tokens > tier.above_input_tokens:
            input_price = input_price if tier.input is None else tier.input
            output_price = output_price if tier.output is None else tier.output
            cached = cached if tier.cached_input is None else tier.cached_input
            written = written if tier.cache_write is None else tier.cache_write
            reasoning = reasoning if tier.reasoning is None else tier.reasoning
    return Rates(
        input=input_price,
        cached_input=input_price if cached is None else cached,
        cache_write=input_price if written is None else written,
        output=output_price,
        reasoning=output_price if reasoning is None else reasoning,
    )


def cached_input_price(price: Price) -> Decimal:
    """The base price of cached prompt tokens: `cached_input`, or `input` when not configured."""
    return price.input if price.cached_input is None else price.cached_input


def _exact_cost(rates: Rates, usage: PricedUsage) -> int:
    """The exact cost of `usage` at `rates`, in 1/`rates.scale` micro-dollars (negative counts are 0)."""
    units = rates.units
    return (
        units[0] * max(usage.input, 0)
        + units[1] * max(usage.cached_input, 0)
        + units[2] * max(usage.cache_write, 0)
        + units[3] * max(usage.output, 0)
        + units[4] * max(usage.reasoning, 0)
    )


def _round_half_up(scaled: int, scale: int) -> int:
    """`scaled / scale` (both >= 0) to the nearest integer, halves up."""
    return (2 * scaled + scale) // (2 * scale)


def _round_up(scaled: int, scale: int) -> int:
    return -(-scaled // scale)


def _to_int(value: Decimal, rounding: str) -> int:
    return int(value.quantize(_ONE, rounding=rounding, context=_EXACT))


def cost_micros(price: Price, usage: PricedUsage | Usage) -> int:
    """The cost of one request, rounded half-up once to whole micro-dollars (settlement).

    A limiter `Usage` is read as OpenAI counts (`PricedUsage.from_usage`). Negative counts are 0.
    """
    priced = PricedUsage.from_usage(usage) if isinstance(usage, Usage) else usage
    rates = rates_for(price, priced.prompt_tokens)
    return _round_half_up(_exact_cost(rates, priced), rates.scale)


def reservation_micros(price: Price, prompt_tokens: int, max_output_tokens: int) -> int:
    """The worst-case cost of a request, rounded up: what admission reserves against a budget.

    The tier is the one for `prompt_tokens` (the estimate); prompt tokens are priced at the dearest
    of that tier's input, cached-input and cache-write prices, output tokens at the dearer of its
    output and reasoning prices. So the reservation covers every usage with at most these token
    counts, however it splits into classes.
    """
    prompt, output = max(prompt_tokens, 0), max(max_output_tokens, 0)
    worst = price_table(price).rates(prompt)[1]
    return _round_up(_exact_cost(worst, PricedUsage(input=prompt, output=output)), worst.scale)


def usd_to_micros(usd: Decimal) -> int:
    """Dollars to micro-dollars, rounded half-up (e.g. a configured daily budget)."""
    return _to_int(_EXACT.multiply(Decimal(usd), MICROS_PER_USD), ROUND_HALF_UP)


def micros_to_usd(micros: int) -> Decimal:
    """Micro-dollars to dollars, exactly, with six decimal places."""
    return Decimal(micros).scaleb(-6, context=_EXACT).quantize(_MICRO, context=_EXACT)


def format_usd(micros: int) -> str:
    """`1234567` -> `"$1.234567"`; negative amounts read `"-$0.500000"`."""
    sign = "-" if micros < 0 else ""
    return f"{sign}${micros_to_usd(abs(micros))}"
