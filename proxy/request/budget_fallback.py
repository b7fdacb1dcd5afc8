"""Budget-aware routing: a request its budget refuses on its model, served by a cheaper one.

`models.NAME.on_budget_exhausted: {fallback_model: OTHER}`: when admission refuses a request
because a budget (its key's, team's, end user's or the organisation's) cannot hold its worst case
on NAME, it is admitted once more as a call to OTHER, at OTHER's price and `default_max_tokens`.
If that fits, OTHER serves it: reserved, settled and booked in the ledger as OTHER, the upstream's
answer naming OTHER's model, and `x-proxy-fallback: budget` on the response. If it does not, the
first refusal stands (a rate limit on OTHER is told as itself: it passes, the budget would not).

One hop, never a chain; no fallback for a key that may not use OTHER, for a prompt that does not
fit OTHER's context window, or for a call pinned to the target holding its previous response.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..config import Config, Model, Target
from ..errors import BudgetExceeded, InvalidRequest
from ..limits.admission import Ticket
from ..limits.limiter import Limiter
from ..limits.quotas import NO_QUOTAS, QuotaCandidates
from .admit import admit
from .authenticate import Caller
from .call import Call, parse_call
from .read import apply_context_policy


async def admit_within_budget(
    limiter: Limiter,
    caller: Caller,
    call: Call,
    model: Model,
    config: Config,
    headers: Mapping[str, str],
    quotas_of: Callable[[Sequence[Target]], QuotaCandidates] = lambda _: NO_QUOTAS,
) -> tuple[Ticket, Call, Model]:
    """The ticket, and the call and model that will serve it (the fallback's, when it took over);
    `quotas_of` gives a model's targets' upstream quotas."""
    try:
        return await admit(limiter, caller, call, model, config, headers, quotas_of(model.targets)), call, model
    except BudgetExceeded as refused:
        fallback = fallback_call(call, model, caller, config)
        if fallback is None:
            raise
        cheaper_call, cheaper = fallback
        try:
            cheaper_quotas = quotas_of(cheaper.targets)
            ticket = await admit(limiter, caller, cheaper_call, cheaper, config, headers, cheaper_quotas)
            return ticket, cheaper_call, cheaper
        except BudgetExceeded:
            raise refused from None


def fallback_call(call: Call, model: Model, caller: Caller, config: Config) -> tuple[Call, Model] | None:
    """`call` as a call to the model's budget fallback, or None when it has none this call may use."""
    rule = model.on_budget_exhausted
    cheaper = config.models.get(rule.fallback_model) if rule is not None else None
    if rule is None or cheaper is None or not caller.may_use(rule.fallback_model):
        return None
    body = {**call.body, "model": rule.fallback_model}
    try:
        fallback = parse_call(call.endpoint, body, cheaper.default_max_tokens)
        fallback.prompt_tokens = apply_context_policy(
            cheaper, call.endpoint, body, fallback.prompt_tokens, fallback.max_output
        )
    except InvalidRequest:
        return None
    fallback.fallback_from = call.model
    return fallback, cheaper
