"""A `Spread` exports what prometheus-client's own `Histogram.observe` would have."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram

from router.metrics import LATENCY_BUCKETS, Metrics, Spread

VALUES = [0.0, 0.05, 0.0500001, 0.1, 3.0, 120.0, 121.0, math.inf, -1.0, 1e-9, 0.3, 0.1 + 0.2, 7.25]


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def test_spread_exports_the_samples_observe_would() -> None:
    direct, wrapped = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("h", "h", ["model"], buckets=LATENCY_BUCKETS, registry=direct).labels("a")
    spread = Spread(Histogram("h", "h", ["model"], buckets=LATENCY_BUCKETS, registry=wrapped).labels("a"))
    for value in VALUES:
        plain.observe(value)
        spread.observe(value)
    spread.flush()
    assert _samples(wrapped) == _samples(direct)
    # Totals are written, not added: flushing again changes nothing.
    spread.flush()
    assert _samples(wrapped) == _samples(direct)


def test_nan_counts_in_the_sum_only() -> None:
    registry = CollectorRegistry()
    spread = Spread(Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=registry))
    spread.observe(math.nan)
    spread.flush()
    assert registry.get_sample_value("h_count") == 0
    assert math.isnan(registry.get_sample_value("h_sum") or 0.0)


def test_a_collection_sees_every_observation() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.request_duration.labels("student").observe(0.2)
    metrics.overhead.observe(0.0003)
    metrics.score.observe(0.4)
    assert registry.get_sample_value("triage_request_duration_seconds_count", {"model": "student"}) == 1
    bucket = {"model": "student", "le": "0.25"}
    assert registry.get_sample_value("triage_request_duration_seconds_bucket", bucket) == 1
    assert registry.get_sample_value("triage_overhead_seconds_sum") == 0.0003
    assert registry.get_sample_value("triage_classifier_score_bucket", {"le": "0.35"}) == 0
    assert registry.get_sample_value("triage_classifier_score_bucket", {"le": "0.4"}) == 1
