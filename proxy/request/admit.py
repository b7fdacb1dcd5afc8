"""The admit stage: reserve the call's worst case against its key's and team's limits and budgets.

The reservation is the estimated prompt plus the most the call may produce (`n` x `max_tokens`),
in tokens and in micro-dollars at the model's price; settlement later swaps it for what the
response really used. A refusal is the client's 429 (or 503 when the store is out and
`on_redis_error: deny`), with OpenAI's headers.
"""

from __future__ import annotations

from ..config import Model
from ..http.responses import new_request_id
from ..limits.limiter import Limiter, Ticket, reserved_tokens
from ..pricing import reservation_micros
from .authenticate import Caller
from .call import Call


async def admit(limiter: Limiter, caller: Caller, call: Call, model: Model) -> Ticket:
    """The ticket of an admitted call; raises the refusal (RateLimited, BudgetExceeded, StoreUnavailable)."""
    return await limiter.admit(
        new_request_id(), caller, reserved_tokens(call.prompt_tokens, call.max_output),
        reservation_micros(model.price_per_mtok, call.prompt_tokens, call.max_output),
    )
