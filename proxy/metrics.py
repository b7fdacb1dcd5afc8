"""Prometheus metrics: names and labels are a public contract (dashboards and alerts use them).

Labels are config names (team, key, model, upstream), so cardinality is bounded by the config;
never a key, a hash or a request id. Under `--workers N` every worker writes its samples to
$PROMETHEUS_MULTIPROC_DIR and `/metrics` aggregates them (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

from .limits.layout import UNLIMITED
from .limits.types import QuotaLeft, QuotaLimits
from .observe import Outcome

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MICROS = 1_000_000
STORE_OPS = ("admit", "settle", "flush", "renew", "hold", "holds")
QUOTA_LIMITS = ("requests", "tokens", "parallel")  # the `limit` label of an upstream quota's remaining


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A metric's labelled children, each looked up by `labels()` once: prometheus_client
    validates the labels and takes a lock on every `labels()` call (~2 us), and a request
    records about ten (`finished`). The children are those the metric keeps anyway."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    """Every metric of one app, registered in the app's own registry."""

    def __init__(self) -> None:
        # *_created series double the exposition for nothing we use (prometheus_client: untyped function)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llm_proxy_requests",
            "Requests answered, by final status and endpoint (chat, completions, embeddings, responses, messages, "
            "count_tokens).",
            ["team", "key", "model", "status", "endpoint"],
            registry=r,
        )
        self.duration = Histogram(
            "llm_proxy_request_duration_seconds",
            "Request to last byte.",
            ["team", "model", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llm_proxy_time_to_first_token_seconds",
            "Request to first streamed byte.",
            ["team", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "llm_proxy_upstream_duration_seconds",
            "From sending to the upstream to its last byte.",
            ["upstream", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llm_proxy_overhead_seconds",
            "Time spent in the proxy itself, excluding the upstream and retry waits.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llm_proxy_tokens",
            "Tokens used, as the upstream reported them.",
            ["team", "key", "model", "kind"],
            registry=r,
        )
        self.spend = Counter(
            "llm_proxy_spend_usd", "Spend at the configured prices.", ["team", "key", "model"], registry=r
        )
        self.budget_fallbacks = Counter(
            "llm_proxy_budget_fallbacks",
            "Requests a budget refused on `model` and its on_budget_exhausted.fallback_model admitted instead.",
            ["model", "fallback_model"],
            registry=r,
        )
        self.rejections = Counter(
            "llm_proxy_rejections",
            'Requests refused by the proxy; shadow="true": a budget in shadow mode would have refused one.',
            ["team", "key", "reason", "shadow"],
            registry=r,
        )
        self.budget_spent = Gauge(
            "llm_proxy_budget_spent_usd",
            "Today's spend, from the shared ledger.",
            ["scope", "name"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_limit = Gauge(
            "llm_proxy_budget_limit_usd", "Daily budget.", ["scope", "name"], registry=r, multiprocess_mode="mostrecent"
        )
        self.budget_alert = Gauge(
            "llm_proxy_budget_alert",
            "1 once today's spend passed budget_alert_ratio.",
            ["scope", "name"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.inflight = Gauge(
            "llm_proxy_inflight_requests",
            "Admitted requests not yet settled.",
            ["team"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.retries = Counter(
            "llm_proxy_upstream_retries", "Upstream attempts retried.", ["upstream", "reason"], registry=r
        )
        self.upstream_errors = Counter(
            "llm_proxy_upstream_errors", "Failed upstream attempts.", ["upstream", "kind"], registry=r
        )
        self.quota_remaining = Gauge(
            "llm_proxy_upstream_quota_remaining",
            "What an upstream quota had left after the latest admission against it: limit requests | tokens "
            "| parallel; model \"\" is the upstream account's quota, else a target's (its deployment's).",
            ["upstream", "model", "limit"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.queue_wait = Histogram(
            "llm_proxy_queue_wait_seconds",
            "Time requests waited in the queue for capacity (limits.max_wait_ms), admitted or not.",
            ["team"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.queue_depth_gauge = Gauge(
            "llm_proxy_queue_depth",
            "Requests waiting in the queue for capacity now.",
            ["team"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_errors = Counter("llm_proxy_store_errors", "Rate-limit store calls that failed.", ["op"], registry=r)
        for op in STORE_OPS:  # present from the start, so increase() sees the very first error
            self.store_errors.labels(op)

        # the children a request records, looked up once each (`Children`)
        self._inflight, self._requests, self._tokens = (
            Children(self.inflight),
            Children(self.requests),
            Children(self.tokens),
        )
        self._spend, self._duration, self._ttft = Children(self.spend), Children(self.duration), Children(self.ttft)
        self._upstream_duration = Children(self.upstream_duration)
        self._budget_limit, self._budget_spent = Children(self.budget_limit), Children(self.budget_spent)

    # -- observer -----------------------------------------------------------------------------
    def admitted(self, outcome: Outcome) -> None:
        if outcome.caller is not None:
            self._inflight(outcome.caller.team_name).inc()
        if outcome.fallback_from is not None:
            self.budget_fallbacks.labels(outcome.fallback_from, outcome.model).inc()

    def finished(self, outcome: Outcome) -> None:
        caller = outcome.caller
        team, key = (caller.team_name, caller.key_name) if caller else ("", "")
        model = outcome.model
        if outcome.ticket is not None:
            self._inflight(team).dec()
        self._requests(team, key, model, str(outcome.status), outcome.endpoint).inc()
        if outcome.rejection:
            self.rejections.labels(team, key, outcome.rejection, "false").inc()
        attempts = outcome.attempts
        for upstream, reason in attempts.reasons:
            self.retries.labels(upstream, reason).inc()
        for upstream, kind in attempts.errors:
            self.upstream_errors.labels(upstream, kind).inc()
        if outcome.ticket is None:
            return
        for _ in outcome.ticket.decision.shadow:
            self.rejections.labels(team, key, "budget", "true").inc()
        for shadow in outcome.ticket.decision.shadow_limits:
            self.rejections.labels(team, key, shadow.partition(":")[2], "true").inc()
        usage = outcome.usage
        for kind, value in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("cached", usage.cached_tokens),
            ("cache_write", usage.cache_write_tokens),
            ("reasoning", usage.reasoning_tokens),
        ):
            if value:
                self._tokens(team, key, model, kind).inc(value)
        if outcome.cost_micros:
            self._spend(team, key, model).inc(outcome.cost_micros / MICROS)
        self._duration(team, model, "true" if outcome.stream else "false").observe(
            outcome.finished_at - outcome.started_at
        )
        if outcome.first_byte_at:
            self._ttft(team, model).observe(outcome.first_byte_at - outcome.started_at)
        if attempts.first_attempt_at and outcome.upstream_finished_at:
            upstream_time = outcome.upstream_finished_at - attempts.first_attempt_at
            self._upstream_duration(attempts.upstream, attempts.target_model).observe(
                outcome.upstream_finished_at - attempts.last_attempt_at
            )
            waited = upstream_time + outcome.queued_s  # neither is the proxy's own time
            self.overhead.observe(max(0.0, outcome.finished_at - outcome.started_at - waited))

    # -- the queue ----------------------------------------------------------------------------
    def queue_teams(self, teams: Iterable[str]) -> None:
        """Expose these teams' queue series at zero before anyone waits: a series that first
        appears at its final value shows no increase to rate() or increase(), so the first waits
        after a start would never reach the dashboard. Idempotent: a value already there stays."""
        for team in teams:
            self.queue_wait.labels(team)
            self.queue_depth_gauge.labels(team)

    def queue_depth(self, team: str, depth: int) -> None:
        self.queue_depth_gauge.labels(team).set(depth)

    def queue_waited(self, team: str, seconds: float) -> None:
        self.queue_wait.labels(team).observe(seconds)

    def store_error(self, op: str) -> None:
        self.store_errors.labels(op).inc()

    # -- upstream quotas ----------------------------------------------------------------------
    def set_quota_left(self, scopes: tuple[QuotaLimits, ...], left: tuple[QuotaLeft, ...]) -> None:
        """Each quota scope's remaining requests, tokens and parallel slots, as the store replied."""
        for scope, remaining in zip(scopes, left, strict=False):
            for limit, value in zip(QUOTA_LIMITS, remaining, strict=True):
                if value != UNLIMITED:
                    self.quota_remaining.labels(scope.upstream, scope.model, limit).set(value)

    # -- budgets ------------------------------------------------------------------------------
    def set_budget(self, scope: str, name: str, limit_micros: int | None, spent_micros: int | None = None) -> None:
        if limit_micros is not None:
            self._budget_limit(scope, name).set(limit_micros / MICROS)
        if spent_micros is not None:
            self._budget_spent(scope, name).set(spent_micros / MICROS)

    def set_alert(self, scope: str, name: str, active: bool) -> None:
        self.budget_alert.labels(scope, name).set(1 if active else 0)

    @staticmethod
    def worker_exited() -> None:
        """Drop this worker's live gauges (in-flight) from the aggregate."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # prometheus_client

    # -- exposition ---------------------------------------------------------------------------
    def exposition(self) -> bytes:
        if multiprocess_dir():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client
            return generate_latest(registry)
        return generate_latest(self.registry)
