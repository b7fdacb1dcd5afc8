"""Following the provider: no requests into a window the provider has said is empty.

When a target (an upstream and the model asked of it) answers 429, or shows one of its limits at
zero, it is *held* until that limit resets (`proxy.upstream.provider_limits` reads the headers),
never longer than its upstream's `max_hold_s`. `forward` skips a held target for the next one;
when every target left is held, a request waits if the earliest hold ends within `HOLD_WAIT_S`
(and its deadline), and is otherwise refused at once with a 429 in its API's shape and the
hold's `retry-after`, without being sent.

Each replica keeps its holds on its own monotonic clock; `proxy.request.shared_holds` shares them
through the store: a new or longer hold is handed to `on_hold`, and the holds of the other replicas
come back through `adopt`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

from ..config import Target
from ..errors import Retry, UpstreamHeld
from ..limits.headers import openai_duration, retry_headers
from ..upstream.provider_limits import HoldKind, provider_hold

HOLD_WAIT_S = 1.0  # a hold ending sooner is waited out (the backoff a retry would wait anyway)
TargetKey = tuple[str, str]  # (upstream, the model asked of it)
OnHold = Callable[[TargetKey, float, HoldKind], None]  # a new or longer hold: its target, seconds, kind


class ProviderHolds:
    """Until when each held target is held, by this process's monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall = wall
        self._until: dict[TargetKey, tuple[float, HoldKind]] = {}
        self.on_hold: OnHold | None = None  # told of each hold this replica's answers make or lengthen

    def follow(self, target: Target, api: str, max_hold_s: float, status: int, headers: Mapping[str, str]) -> None:
        """Hold `target` if its answer (`status`, `headers`) says its window is empty."""
        if max_hold_s <= 0:
            return
        hold = provider_hold(api, status, headers, self.wall())
        if hold is None:
            return
        seconds = min(hold.seconds, max_hold_s)
        key = (target.upstream, target.model)
        if self._hold(key, seconds, hold.kind) and self.on_hold is not None:
            self.on_hold(key, seconds, hold.kind)

    def adopt(self, key: TargetKey, seconds: float, kind: HoldKind) -> None:
        """Hold `key` for `seconds` from now unless it already is for longer: another replica's hold."""
        if seconds > 0:
            self._hold(key, seconds, kind)

    def _hold(self, key: TargetKey, seconds: float, kind: HoldKind) -> bool:
        """Hold `key` until `seconds` from now, unless it is held longer already; True if it was not."""
        until = self.clock() + seconds
        held = self._until.get(key)
        if held is not None and held[0] >= until:
            return False
        self._until[key] = (until, kind)
        return True

    def remaining(self, target: Target) -> float:
        """Seconds until `target` may be sent requests again (0: now)."""
        if not self._until:
            return 0.0
        key = (target.upstream, target.model)
        held = self._until.get(key)
        if held is None:
            return 0.0
        left = held[0] - self.clock()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left

    def any_free(self, targets: Sequence[Target]) -> bool:
        return any(self.remaining(target) <= 0 for target in targets)

    def refusal(self, targets: Sequence[Target]) -> UpstreamHeld:
        """The 429 for a request whose every target left is held: retry when the first hold ends."""
        waits = [(self.remaining(target), target) for target in targets]
        wait, target = min(waits, key=lambda pair: pair[0])
        kind = self._until.get((target.upstream, target.model), (0.0, "requests"))[1]
        millis = max(1, math.ceil(wait * 1000))
        return UpstreamHeld(
            f"Rate limit reached at the provider: upstream '{target.upstream}' has no {kind} left for "
            f"'{target.model}' until its limit resets, so the proxy does not send it this request. "
            f"Please try again in {openai_duration(millis)}.",
            limit_type=kind,
            headers=retry_headers(millis),
            retry=Retry(millis, True, frozenset(("target", t.upstream, t.model) for t in targets)),
        )

    def refuse_if_held(self, targets: Sequence[Target]) -> None:
        """Before admission: refuse at once when every target is held for longer than a cheap wait."""
        if not self._until:
            return
        if all(self.remaining(target) > HOLD_WAIT_S for target in targets):
            raise self.refusal(targets)
