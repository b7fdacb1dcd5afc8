"""Upstream quotas as the store takes them, built once per config.

A provider's quota is its account's (`upstreams.NAME.limits`) and, for one deployment, a target's
(`models.M.targets[i].limits`, keyed by the upstream and the model asked of it: every target
naming that pair shares it). A request sent to a target uses both. Admission gets the request's
candidate targets in order, each as its quota scopes, and takes the first whose every scope fits
(`proxy.limits.lua/admit.lua`); a target without quotas always fits, so the candidates end at the
first one. The fallback ones are what one replica of `store.replicas` may admit while the shared
store is out (`on_redis_error: allow`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Config, Quota, Target
from .types import Candidates, QuotaLimits

Deployment = tuple[str, str]  # (upstream, the model asked of it)


def quota_limits(upstream: str, model: str, quota: Quota, divisor: int = 1) -> QuotaLimits:
    """One quota scope's limits, each divided by `divisor` (at least 1 where there is a limit)."""

    def part(value: int | None) -> int | None:
        return None if value is None else max(1, value // divisor)

    return QuotaLimits(upstream, model, part(quota.rpm), part(quota.tpm), part(quota.max_parallel))


@dataclass(frozen=True, slots=True)
class QuotaCandidates:
    """The targets a request may be admitted to (in order), with their quota scopes as the shared
    store takes them and as the fallback does. Empty: no quota applies."""

    targets: tuple[Target, ...] = ()
    shared: Candidates = ()
    fallback: Candidates = ()


NO_QUOTAS = QuotaCandidates()


class UpstreamQuotas:
    """Every target's quota scopes in one config."""

    def __init__(self, config: Config) -> None:
        replicas = config.store.replicas
        self._upstreams = {
            name: (quota_limits(name, "", u.limits), quota_limits(name, "", u.limits, replicas))
            for name, u in config.upstreams.items()
            if u.limits is not None
        }
        self._deployments: dict[Deployment, tuple[QuotaLimits, QuotaLimits]] = {}
        for model in config.models.values():
            for target in model.targets:
                if target.limits is not None:
                    pair = (target.upstream, target.model)
                    self._deployments[pair] = (
                        quota_limits(*pair, target.limits),
                        quota_limits(*pair, target.limits, replicas),
                    )

    def __bool__(self) -> bool:
        return bool(self._upstreams or self._deployments)

    def _scopes(self, target: Target) -> tuple[tuple[QuotaLimits, ...], tuple[QuotaLimits, ...]]:
        found = [
            q
            for q in (self._upstreams.get(target.upstream), self._deployments.get((target.upstream, target.model)))
            if q
        ]
        return tuple(shared for shared, _ in found), tuple(fallback for _, fallback in found)

    def metered(self, target: Target) -> bool:
        return target.upstream in self._upstreams or (target.upstream, target.model) in self._deployments

    def candidates(self, targets: Sequence[Target]) -> QuotaCandidates:
        """`targets` up to the first without quotas (which always fits), with their scopes; NO_QUOTAS
        when the first has none."""
        if not self or not targets or not self.metered(targets[0]):
            return NO_QUOTAS
        chosen: list[Target] = []
        shared: list[tuple[QuotaLimits, ...]] = []
        fallback: list[tuple[QuotaLimits, ...]] = []
        for target in targets:
            ours, theirs = self._scopes(target)
            chosen.append(target)
            shared.append(ours)
            fallback.append(theirs)
            if not ours:
                break
        return QuotaCandidates(tuple(chosen), tuple(shared), tuple(fallback))

    def forward_targets(
        self, candidates: QuotaCandidates, index: int | None, targets: Sequence[Target]
    ) -> list[Target]:
        """Where the forward stage may send an admitted request: the candidate admission chose, then
        the later targets without quotas (a metered one's capacity was not reserved). Without
        candidates, every target as it comes."""
        if index is None or not candidates.targets:
            return list(targets)
        chosen = candidates.targets[index]
        later = list(targets)[list(targets).index(chosen) + 1 :] if chosen in targets else []
        return [chosen, *(t for t in later if not self.metered(t))]
