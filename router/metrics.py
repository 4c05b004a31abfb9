"""Every Prometheus metric the gateway exports, declared once against a given registry.

Labels take values from config only (model names, fixed reason and type
vocabularies), never from a request, so series stay bounded. Known label sets
are created at start so dashboards show zeros instead of gaps.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from router.config import API_NAMES

__all__ = [
    "FALLBACK_REASONS",
    "MULTIPROC_ENV",
    "POOL_STATES",
    "UPSTREAM_ERROR_TYPES",
    "CounterFamily",
    "Level",
    "Metrics",
    "Spread",
    "Tally",
    "exported",
    "exposition",
]

# LLM-sized: generations take seconds to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The gateway's own time per request is micro- to milliseconds.
OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
CLASSIFIER_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005)

FALLBACK_REASONS = (
    "upstream_error",
    "timeout",
    "empty",
    "length",
    "refusal",
    "invalid_json",
    "tool_call",
    "low_confidence",
    "repetition",
    "context_length",
    "unsupported_input",
)
UPSTREAM_ERROR_TYPES = ("unavailable", "timeout", "status", "truncated", "too_large", "redirect")
POOL_STATES = ("in_use", "waiting")
STATUS_CLASSES = ("2xx", "4xx", "5xx")
# Set (by `triage serve --workers`) to the folder where every worker writes its values.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


M = TypeVar("M", Gauge, Histogram)
W = TypeVar("W", "Tally", "Spread")


class Family(Generic[M]):
    """A labelled metric whose children are looked up once and then reused.

    prometheus-client's `labels()` validates and locks on every call; the hot
    path calls it a dozen times per request with label values from config.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        """The child for these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Tally:
    """A counter child whose increments add up in a plain number until `Metrics.sample`.

    `Counter.inc` takes a lock and runs two checks (about 3 µs); a request increments a
    dozen counters. The sum is added to the counter before every collection (so a scrape
    sees every increment) and once a second in worker processes.
    """

    __slots__ = ("counter", "flushed", "total")

    # Flushes may come from another thread (a collector called off the event loop), so the
    # request path only ever adds to `total` and a flush only moves `flushed`: an increment
    # racing a flush is handed over at the next one instead of being lost.
    _flush_lock = threading.Lock()

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.total = 0.0
        self.flushed = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Count `amount` (not negative)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.total += amount

    def flush(self) -> None:
        """Add what was counted since the last flush to the counter."""
        with self._flush_lock:
            total = self.total
            if total != self.flushed:
                self.counter.inc(total - self.flushed)
                self.flushed = total


class _Flushed(Generic[W]):
    """A labelled metric whose children are wrappers (`Tally`, `Spread`), created once and
    flushed when sampled."""

    __slots__ = ("_children", "_flushed", "_wrap", "metric")

    def __init__(self, metric: Counter | Histogram, wrap: Callable[[Any], W], flushed: list[W]) -> None:
        self.metric = metric
        self._wrap: Callable[[Any], W] = wrap
        self._children: dict[tuple[str, ...], W] = {}
        self._flushed: list[W] = flushed

    def labels(self, *values: str) -> W:
        """The wrapped child for these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._wrap(self.metric.labels(*values))
            self._flushed.append(child)
        return child


class CounterFamily(_Flushed[Tally]):
    """A labelled counter whose children are `Tally`s, created once and flushed when sampled."""

    __slots__ = ()

    def __init__(self, metric: Counter, tallies: list[Tally]) -> None:
        super().__init__(metric, Tally, tallies)


class Spread:
    """A histogram (or labelled child) whose observations add up in plain numbers until `Metrics.sample`.

    `Histogram.observe` takes a lock for the sum and another for the bucket (about 2 µs); a
    request observes three to five. Here an observation adds to the sum and one bucket's
    count, and a sample writes those totals into the histogram (before every collection, and
    once a second in worker processes). Totals are written, not added: the exported sum is
    the very one `observe` would have kept, and an observation racing a sample is exported
    at the next one. Only this wrapper may observe its histogram.
    """

    __slots__ = ("_bounds", "_counts", "_sum", "histogram")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        # prometheus-client's own bounds (the last is +Inf), one count per bucket value.
        self._bounds: tuple[float, ...] = tuple(histogram._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        """Observe `amount`: it counts in the first bucket whose bound holds it (NaN in none)."""
        self._sum += amount
        i = bisect_left(self._bounds, amount)
        if amount <= self._bounds[i]:
            self._counts[i] += 1

    def flush(self) -> None:
        """Write the sum and the bucket counts into the histogram."""
        histogram = self.histogram
        histogram._sum.set(self._sum)
        for value, count in zip(histogram._buckets, self._counts, strict=True):
            value.set(count)


class SpreadFamily(_Flushed[Spread]):
    """A labelled histogram whose children are `Spread`s, created once and flushed when sampled."""

    __slots__ = ()

    def __init__(self, metric: Histogram, spreads: list[Spread]) -> None:
        super().__init__(metric, Spread, spreads)


class Level:
    """A gauge's value kept as a plain number where it changes, copied into the gauge when sampled.

    Setting a prometheus-client gauge takes a lock and a few checks (about 3 µs); the
    in-flight and pool counts change several times per request, so the hot path adds
    to `value` and `Metrics.sample` copies every level into its gauge at scrape time
    (and once a second in each worker process, whose values other workers export).
    """

    __slots__ = ("gauge", "value")

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.value = 0


class _Sampler(Collector):
    """Copies the levels into their gauges whenever the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        self._metrics.sample()
        return ()


def exported(registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics reads: this registry, or every worker's values merged in multiprocess mode.

    The dashboard's JSON collects from the same place, so its numbers are the scrape's.
    """
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text for /metrics: this registry, or every worker's values in multiprocess mode."""
    return generate_latest(exported(registry))


class Metrics:
    """The gateway's metric families, bound to one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._levels: dict[int, Level] = {}
        self._tallies: list[Tally] = []
        self._spreads: list[Spread] = []
        # Registered before any gauge, so a collection samples the levels first.
        registry.register(_Sampler(self))
        self.requests = CounterFamily(
            Counter(
                "triage_requests",
                "Requests answered, by serving model, route reason and status class.",
                ["model", "reason", "status_class"],
                registry=registry,
            ),
            self._tallies,
        )
        self.api_requests = CounterFamily(
            Counter(
                "triage_api_requests",
                "Requests answered, by the API the client spoke (chat, completions, responses, "
                "messages, embeddings) and status class.",
                ["api", "status_class"],
                registry=registry,
            ),
            self._tallies,
        )
        self.routing_decisions = CounterFamily(
            Counter(
                "triage_routing_decisions",
                "Initial routing decisions by chosen model and reason.",
                ["model", "reason"],
                registry=registry,
            ),
            self._tallies,
        )
        self.prompt_tokens = CounterFamily(
            Counter(
                "triage_prompt_tokens",
                "Prompt tokens by model; estimated=true when upstream gave no usage.",
                ["model", "estimated"],
                registry=registry,
            ),
            self._tallies,
        )
        self.completion_tokens = CounterFamily(
            Counter(
                "triage_completion_tokens",
                "Completion tokens by model; estimated=true when upstream gave no usage.",
                ["model", "estimated"],
                registry=registry,
            ),
            self._tallies,
        )
        self.usage_missing = CounterFamily(
            Counter(
                "triage_usage_missing",
                "Upstream answers that carried no usage (tokens estimated).",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        self.cost = CounterFamily(
            Counter(
                "triage_cost_usd",
                "Spend in USD by model, every attempt included.",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        self.teacher_cost = CounterFamily(
            Counter(
                "triage_teacher_equivalent_cost_usd",
                "What the served answers would have cost at the teacher's prices, by serving model.",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        self.fallbacks = CounterFamily(
            Counter(
                "triage_fallbacks",
                "Requests moved from one model to the teacher, by reason.",
                ["model", "reason"],
                registry=registry,
            ),
            self._tallies,
        )
        self.upstream_errors = CounterFamily(
            Counter(
                "triage_upstream_errors",
                "Failed upstream attempts by model and error type.",
                ["model", "type"],
                registry=registry,
            ),
            self._tallies,
        )
        self.score = self._spread(
            Histogram(
                "triage_classifier_score",
                "Complexity scores of routed requests.",
                buckets=SCORE_BUCKETS,
                registry=registry,
            )
        )
        self.classifier_duration = self._spread(
            Histogram(
                "triage_classifier_duration_seconds",
                "Time to score one request.",
                buckets=CLASSIFIER_BUCKETS,
                registry=registry,
            )
        )
        self.request_duration = SpreadFamily(
            Histogram(
                "triage_request_duration_seconds",
                "Total request time by serving model.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            self._spreads,
        )
        self.ttft = SpreadFamily(
            Histogram(
                "triage_time_to_first_token_seconds",
                "Time to the first streamed event, by model.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            self._spreads,
        )
        self.upstream_duration = SpreadFamily(
            Histogram(
                "triage_upstream_duration_seconds",
                "Time spent waiting on upstreams, by model.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            self._spreads,
        )
        self.overhead = self._spread(
            Histogram(
                "triage_overhead_seconds",
                "Gateway time per request: total minus upstream time.",
                buckets=OVERHEAD_BUCKETS,
                registry=registry,
            )
        )
        self.inflight = Family(
            Gauge(
                "triage_inflight_requests",
                "Requests in flight by model.",
                ["model"],
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        self.student_share = Gauge(
            "triage_student_share",
            "Share of classifier-routed requests sent to students over the recent window.",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.student_share_target = Gauge(
            "triage_student_share_target",
            "Configured target share of classifier-routed requests for students (NaN when unset).",
            registry=registry,
            multiprocess_mode="max",
        )
        self.score_threshold = Family(
            Gauge(
                "triage_score_threshold",
                "Effective max_score of each student right now.",
                ["model"],
                registry=registry,
                multiprocess_mode="livemostrecent",
            )
        )
        self.shadow_agreement = SpreadFamily(
            Histogram(
                "triage_shadow_agreement",
                "Agreement in [0, 1] of a student's answer with the teacher's.",
                ["model"],
                buckets=SCORE_BUCKETS,
                registry=registry,
            ),
            self._spreads,
        )
        self.shadow_cost = CounterFamily(
            Counter(
                "triage_shadow_cost_usd",
                "Spend on shadow calls (the teacher asked for a student answer, or the student for a "
                "teacher answer when exploring), by student.",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        self.shadow_requests = CounterFamily(
            Counter(
                "triage_shadow_requests",
                "Shadow comparisons by student and outcome.",
                ["model", "outcome"],
                registry=registry,
            ),
            self._tallies,
        )
        self.circuit_state = Family(
            Gauge(
                "triage_circuit_state",
                "Endpoint circuit: 0 closed, 1 half-open, 2 open.",
                ["model", "endpoint"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        self.circuit_transitions = CounterFamily(
            Counter(
                "triage_circuit_transitions",
                "Circuit breaker transitions by the state entered.",
                ["model", "endpoint", "state"],
                registry=registry,
            ),
            self._tallies,
        )
        self.retry_budget_exhausted = Counter(
            "triage_retry_budget_exhausted",
            "Retries or fallbacks refused because the retry budget was spent.",
            registry=registry,
        )
        self.deadline_exceeded = CounterFamily(
            Counter(
                "triage_deadline_exceeded",
                "Requests ended by the overall request deadline.",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        self.model_info = Family(
            Gauge(
                "triage_model_info",
                "Always 1; the role of each configured model.",
                ["model", "role"],
                registry=registry,
                multiprocess_mode="max",
            )
        )
        self.rejected = CounterFamily(
            Counter(
                "triage_rejected_requests",
                "Requests refused before routing (bad body, unknown model, too large, auth, limits).",
                ["code"],
                registry=registry,
            ),
            self._tallies,
        )
        self.rate_limited = CounterFamily(
            Counter(
                "triage_rate_limited",
                "Requests refused by a per-key limit, by key name and limit.",
                ["key", "limit"],
                registry=registry,
            ),
            self._tallies,
        )
        self.key_cost = CounterFamily(
            Counter(
                "triage_key_cost_usd",
                "Spend in USD by client key name.",
                ["key"],
                registry=registry,
            ),
            self._tallies,
        )
        self.state_up = Gauge(
            "triage_shared_state_up",
            "1 while this process reaches the shared state (Redis), 0 while it does not; NaN "
            "without `state:`.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.state_errors = CounterFamily(
            Counter(
                "triage_shared_state_errors",
                "Redis calls that failed or timed out, by operation (limits, share).",
                ["op"],
                registry=registry,
            ),
            self._tallies,
        )
        self.state_unchecked = CounterFamily(
            Counter(
                "triage_shared_state_unchecked_requests",
                "Requests whose key limits could not be checked in Redis, by outcome: served "
                "(on_failure: fail_open) or refused (fail_closed).",
                ["outcome"],
                registry=registry,
            ),
            self._tallies,
        )
        self.state_pending_usd = Gauge(
            "triage_shared_state_pending_usd",
            "Spend counted here but not yet written to Redis (written when it answers again).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.state_duration = Histogram(
            "triage_shared_state_duration_seconds",
            "Round trips to Redis for limits (one per batch of requests).",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.reloads = CounterFamily(
            Counter(
                "triage_config_reloads",
                "Config reloads by result.",
                ["result"],
                registry=registry,
            ),
            self._tallies,
        )
        self.pool_connections = Family(
            Gauge(
                "triage_upstream_pool_connections",
                "Requests holding (in_use) or queued for (waiting) a pooled upstream connection, by model.",
                ["model", "state"],
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        self.pool_timeouts = CounterFamily(
            Counter(
                "triage_upstream_pool_timeouts",
                "Requests that waited pool_timeout_s for a pooled connection and got 503, by model.",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        self.admitted = Gauge(
            "triage_admitted_requests",
            "Completion requests in progress against server.max_inflight_requests.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.client_disconnects = CounterFamily(
            Counter(
                "triage_client_disconnects",
                "Requests whose client left before the answer; upstream work was cancelled. By model.",
                ["model"],
                registry=registry,
            ),
            self._tallies,
        )
        # Counted by the store's writer thread, once per batch: plain counters.
        self.store_written = Counter(
            "triage_store_written_records",
            "Records (requests and shadow comparisons) written to the traffic store.",
            registry=registry,
        )
        self.store_dropped = CounterFamily(
            Counter(
                "triage_store_dropped_records",
                "Records the traffic store did not keep: queue_full (the database was slow or down "
                "and store.max_queue records already waited) or shutdown (still unwritten at exit).",
                ["reason"],
                registry=registry,
            ),
            self._tallies,
        )
        self.store_errors = Counter(
            "triage_store_write_errors",
            "Failed attempts to reach or write the traffic store (the records are kept and retried).",
            registry=registry,
        )
        self.build_info = Family(
            Gauge(
                "triage_build_info",
                "Always 1; labels carry the version and config hash.",
                ["version", "config_hash"],
                registry=registry,
                multiprocess_mode="max",
            )
        )

    def precreate(self, models: Iterable[str], reasons: Iterable[str]) -> None:
        """Create the known label sets so every series exists from the first scrape."""
        reasons = tuple(reasons)
        for api in API_NAMES:
            for status in STATUS_CLASSES:
                self.api_requests.labels(api, status)
        for model in models:
            for reason in reasons:
                self.routing_decisions.labels(model, reason)
                for status in STATUS_CLASSES:
                    self.requests.labels(model, reason, status)
            for estimated in ("false", "true"):
                self.prompt_tokens.labels(model, estimated)
                self.completion_tokens.labels(model, estimated)
            self.usage_missing.labels(model)
            self.cost.labels(model)
            self.teacher_cost.labels(model)
            for fb in FALLBACK_REASONS:
                self.fallbacks.labels(model, fb)
            for et in UPSTREAM_ERROR_TYPES:
                self.upstream_errors.labels(model, et)
            self.request_duration.labels(model)
            self.ttft.labels(model)
            self.upstream_duration.labels(model)
            self.inflight.labels(model)
            self.deadline_exceeded.labels(model)
            self.pool_timeouts.labels(model)
            self.client_disconnects.labels(model)
            for state in POOL_STATES:
                self.pool_connections.labels(model, state)

    def _spread(self, histogram: Histogram) -> Spread:
        spread = Spread(histogram)
        self._spreads.append(spread)
        return spread

    def level(self, gauge: Gauge) -> Level:
        """The one `Level` behind this gauge (or labelled child): a reloaded gateway gets the same one."""
        level = self._levels.get(id(gauge))
        if level is None:
            level = self._levels[id(gauge)] = Level(gauge)
        return level

    def sample(self) -> None:
        """Flush every tally and spread and copy every level into its gauge (before a collection, and
        once a second in worker processes)."""
        for tally in self._tallies:
            tally.flush()
        for spread in self._spreads:
            spread.flush()
        for level in self._levels.values():
            level.gauge.set(level.value)
