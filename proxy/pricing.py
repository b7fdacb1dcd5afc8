"""Request cost in integer micro-dollars: exact Decimal arithmetic, one rounding per request.

Prices are USD per million tokens, so `price_per_mtok * tokens` is already the cost in
micro-dollars: no scaling, no float. Costs are rounded once per request (ROUND_HALF_UP) and then
only ever added as ints, so a day's spend is the exact sum of its requests.
Reservations round up (ROUND_CEILING) so they never under-reserve.
"""

from __future__ import annotations

from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, ROUND_CEILING, ROUND_HALF_UP, Context, Decimal

from proxy.config import Price
from proxy.limits.types import Usage

MICROS_PER_USD = 1_000_000

# Additions and multiplications of finite Decimals are exact in this context (never rounded).
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
_ONE = Decimal(1)
_MICRO = Decimal("0.000001")


def cached_input_price(price: Price) -> Decimal:
    """The price of cached prompt tokens: `cached_input`, or `input` when not configured."""
    return price.input if price.cached_input is None else price.cached_input


def _to_int(value: Decimal, rounding: str) -> int:
    return int(value.quantize(_ONE, rounding=rounding, context=_EXACT))


def cost_micros(price: Price, usage: Usage) -> int:
    """The cost of one request, rounded half-up to whole micro-dollars.

    Cached tokens are part of `prompt_tokens` and are priced at the cached price; a usage that
    reports more cached tokens than prompt tokens is read as all-cached. Negative counts are 0.
    """
    prompt = max(usage.prompt_tokens, 0)
    cached = min(max(usage.cached_tokens, 0), prompt)
    completion = max(usage.completion_tokens, 0)
    exact = _EXACT.add(
        _EXACT.add(
            _EXACT.multiply(price.input, prompt - cached),
            _EXACT.multiply(cached_input_price(price), cached),
        ),
        _EXACT.multiply(price.output, completion),
    )
    return _to_int(exact, ROUND_HALF_UP)


def reservation_micros(price: Price, prompt_tokens: int, max_output_tokens: int) -> int:
    """The worst-case cost of a request, rounded up: what admission reserves against a budget.

    Prompt tokens are priced at the higher of the input and cached prices, so the reservation
    covers every usage with at most these token counts, whatever part of it is cached.
    """
    prompt_price = max(price.input, cached_input_price(price))
    exact = _EXACT.add(
        _EXACT.multiply(prompt_price, max(prompt_tokens, 0)),
        _EXACT.multiply(price.output, max(max_output_tokens, 0)),
    )
    return _to_int(exact, ROUND_CEILING)


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
