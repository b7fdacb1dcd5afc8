"""The settle stage: what a response used and cost, its settlement, and who is told.

Runs exactly once per admitted request, after its last byte (or its failure), shielded from
cancellation by the response that calls it. The cost is at the price the request was admitted
with: a reload may have dropped the model since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from ..apis.anthropic import usage_from_message
from ..apis.responses import usage_from_response
from ..budgets.watch import BudgetWatch
from ..config import Price
from ..limits.admission import Ticket
from ..limits.limiter import Limiter
from ..limits.types import Settled, Usage
from ..observe import Observer, Outcome
from ..pricing.cost import cost_micros
from ..tokens import estimate_text_tokens
from ..upstream import sse
from .call import Call

log = logging.getLogger("proxy.gateway")


def usage_of(status: int, payload: bytes, call: Call) -> Usage:
    """The usage a buffered answer reports; estimated from its text when it reports none."""
    if status >= 300:
        return Usage()
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        parsed = None
    if not call.charged:
        return Usage()
    if call.endpoint == "responses":
        usage = usage_from_response(parsed)
    elif call.endpoint == "messages":
        usage = usage_from_message(parsed)
    else:
        usage = sse.usage_from(parsed) if isinstance(parsed, dict) else None
    if usage is not None:
        return usage
    return Usage(call.prompt_tokens, _estimate_completion(parsed), 0)


def _estimate_completion(parsed: object) -> int:
    """No usage from the upstream: count the characters of what it answered."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
        return 0
    text = []
    for choice in parsed["choices"]:
        if isinstance(choice, dict):
            message = choice.get("message")
            content = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(content, str):
                text.append(content)
    return estimate_text_tokens("".join(text))


class Settler:
    def __init__(
        self, limiter: Limiter, observer: Observer, budgets: BudgetWatch, freed: Callable[[], None] | None = None
    ) -> None:
        self.limiter = limiter
        self.observer = observer
        self.budgets = budgets
        self.freed = freed  # told after each settlement: what it released may be what a waiter needs

    async def settle(
        self,
        ticket: Ticket,
        call: Call,
        price: Price,
        usage: Usage,
        outcome: Outcome,
        succeeded: bool = True,
        notify: bool = True,
    ) -> None:
        """Settle once; `notify=False` when the caller reports the outcome itself (a failed call)."""
        if ticket.settled:
            return
        cost = cost_micros(price, usage)
        outcome.usage, outcome.cost_micros = usage, cost
        settled: Settled | None
        try:
            settled = await self.limiter.settle(ticket, call.model, usage, cost, outcome.tags, succeeded)
        except Exception:  # a bug: still counted, and the in-flight gauge still comes down
            log.exception("settling request %s failed", outcome.request_id)
            settled = None
        if self.freed is not None:
            self.freed()
        outcome.finished_at = time.monotonic()
        if notify:
            self.observer.finished(outcome)
        if settled:
            self.budgets.on_settled(ticket, settled)
