"""The words of a budget refusal: who spent what of which budget, and when it resets.

"Team `platform` has spent $99.80 of its $100.00 monthly budget; it resets at 2027-01-01T00:00:00Z."
Amounts are exact (whole cents show two decimals, anything finer up to the micro-dollar). Names
come from config or, for end users, from the request: they are cut to `MAX_NAME` printable
characters, backticks removed. Never pass a key or its hash as a name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from ..pricing.cost import micros_to_usd
from .windows import ADJECTIVES, Window

ScopeKind = Literal["org", "team", "key", "end_user"]
SCOPE_WORDS: dict[ScopeKind, str] = {"org": "Organisation", "team": "Team", "key": "Key", "end_user": "End user"}
MAX_NAME = 64


def usd_text(micros: int) -> str:
    """`99_800_000` -> `"$99.80"`, `1_234_567` -> `"$1.234567"`, `5_000` -> `"$0.005"`: exact."""
    whole, fraction = str(micros_to_usd(abs(micros))).split(".")
    sign = "-" if micros < 0 else ""
    return f"{sign}${whole}.{fraction.rstrip('0').ljust(2, '0')}"


def safe_name(name: str) -> str:
    cleaned = "".join(ch for ch in name if ch.isprintable() and ch != "`")
    return cleaned[:MAX_NAME] + ("..." if len(cleaned) > MAX_NAME else "")


def reset_text(reset_epoch_s: int) -> str:
    return datetime.fromtimestamp(reset_epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def budget_refusal(
    kind: ScopeKind, name: str, spent_micros: int, budget_micros: int, window: Window, resets_at: int
) -> str:
    """The refusal message for the budget of scope `kind` `name` over `window`, ending at `resets_at`
    (epoch seconds). The organisation is one scope: its name is not shown."""
    who = "The organisation" if kind == "org" else f"{SCOPE_WORDS[kind]} `{safe_name(name)}`"
    return (
        f"{who} has spent {usd_text(spent_micros)} of its {usd_text(budget_micros)} {ADJECTIVES[window]} "
        f"budget; it resets at {reset_text(resets_at)}."
    )
