"""The dashboard's numbers: one JSON document from the exported metrics and the recent decisions.

Every aggregate is read from the registry /metrics exports (`metrics.exported`: with workers,
the merged multiprocess files) through the same `stats.summarize` that `triage stats` uses
on a scrape, so the page, `triage stats` and a Prometheus query over /metrics agree. Nothing
is aggregated from the recent records: they only fill the table, a page at a time.

Reading every metric costs several milliseconds of CPU on the event loop, so `Aggregates`
does it at most once per `AGGREGATES_TTL_S` however often the JSON is asked for: a client
polling in a tight loop then costs a page of the table per poll, not a collection. The table
is read on every poll.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from router.dashboard.decisions import DecisionSource, row
from router.metrics import exported
from router.stats import Snapshot, Summary, summarize

__all__ = ["AGGREGATES_TTL_S", "CIRCUIT_STATES", "Aggregates", "SummaryBody", "aggregates"]

# `triage_circuit_state`'s values, in order.
CIRCUIT_STATES = ("closed", "half_open", "open")
# The totals are read again at most this often (the page polls every 2 s, at most every 0.25 s).
AGGREGATES_TTL_S = 0.5


def _num(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return x if x is not None and math.isfinite(x) else None


def _by(pairs: dict[tuple[str, str], float], index: int) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for k, v in pairs.items():
        out[k[index]] += v
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _scores(snap: Snapshot) -> dict[str, Any]:
    """The score histogram as per-bucket counts, and each student's threshold now."""
    buckets = []
    below = 0.0
    for upper, cumulative in snap.buckets("triage_classifier_score"):
        if math.isinf(upper):
            continue  # scores are in [0, 1]; the last finite bucket ends at 1
        buckets.append({"le": upper, "count": cumulative - below})
        below = cumulative
    thresholds = {labels["model"]: _num(value) for labels, value in snap.get("triage_score_threshold")}
    return {
        "buckets": buckets,
        "count": snap.total("triage_classifier_score_count"),
        "thresholds": dict(sorted(thresholds.items())),
    }


def _keys(snap: Snapshot) -> list[dict[str, Any]]:
    spend = snap.by("triage_key_cost_usd_total", "key")
    limited = snap.by("triage_rate_limited_total", "key")
    return [
        {"key": k, "spend_usd": spend.get(k, 0.0), "rate_limited": limited.get(k, 0.0)}
        for k in sorted(set(spend) | set(limited), key=lambda k: (-spend.get(k, 0.0), k))
    ]


def _circuits(snap: Snapshot) -> list[dict[str, Any]]:
    out = []
    for labels, value in snap.get("triage_circuit_state"):
        idx = int(value) if math.isfinite(value) else 0
        state = CIRCUIT_STATES[idx] if 0 <= idx < len(CIRCUIT_STATES) else "unknown"
        out.append({"model": labels.get("model", ""), "endpoint": labels.get("endpoint", ""), "state": state})
    return sorted(out, key=lambda c: (c["model"], c["endpoint"]))


def _aggregates(s: Summary, snap: Snapshot) -> dict[str, Any]:
    fallbacks = {
        "total": sum(s.fallbacks.values()),
        "by_reason": _by(s.fallbacks, 1),
        "by_model": _by(s.fallbacks, 0),
    }
    return {
        "version": s.version,
        "config_hash": s.config_hash,
        "teacher": s.teacher,
        "requests": s.requests,
        "rejected": snap.total("triage_rejected_requests_total"),
        "share": {
            "students": _num(s.student_share),
            "classifier": _num(s.student_share_classifier),
            "target": _num(s.share_target),
            "window": _num(s.share_window),
        },
        "spend": {
            "actual_usd": s.cost,
            "teacher_only_usd": s.teacher_equivalent,
            "savings_usd": s.savings,
            "savings_ratio": _num(s.savings_ratio),
            "shadow_usd": s.shadow_cost,
        },
        "fallbacks": fallbacks,
        "models": [
            {
                "name": m.name,
                "requests": m.requests,
                "status": m.by_status,
                "cost_usd": m.cost,
                "teacher_only_usd": m.teacher_equivalent,
                "latency_p50_s": _num(m.latency_p50),
                "latency_p95_s": _num(m.latency_p95),
                "ttft_p50_s": _num(m.ttft_p50),
                "ttft_p95_s": _num(m.ttft_p95),
            }
            for m in s.models
        ],
        "overhead": {"p50_s": _num(s.overhead_p50), "p99_s": _num(s.overhead_p99)},
        "scores": _scores(snap),
        "keys": _keys(snap),
        "circuits": _circuits(snap),
    }


def aggregates(registry: CollectorRegistry) -> dict[str, Any]:
    """The totals since start, read from what the registry exports, and when they were read."""
    snap = Snapshot.from_families(exported(registry).collect())
    doc = _aggregates(summarize(snap), snap)
    doc["generated_at"] = time.time()
    return doc


# (totals, source, (total, offset, limit), the page's records, the bytes)
_Encoded = tuple[dict[str, Any], DecisionSource, tuple[int, int, int], list[Any], bytes]


class SummaryBody:
    """The JSON body: totals and a page of the table, encoded again only when either changed.

    A poll that finds the same totals document (`Aggregates`) and the same records on its
    page (the same objects, so a new request or a full ring buffer turning over is seen)
    gets the bytes the previous poll got: a tight loop on one page costs no encoding.
    """

    def __init__(self) -> None:
        self._last: _Encoded | None = None

    def body(self, totals: dict[str, Any], source: DecisionSource, offset: int, limit: int) -> bytes:
        """The document for one page, as JSON bytes."""
        total, records = source.page(offset, limit)
        shape = (total, offset, limit)
        last = self._last
        if (
            last is not None
            and last[0] is totals
            and last[1] is source
            and last[2] == shape
            and len(last[3]) == len(records)
            and all(a is b for a, b in zip(last[3], records, strict=True))
        ):
            return last[4]
        table = {"source": source.name, "total": total, "offset": offset, "limit": limit}
        encoded = orjson.dumps({**totals, "decisions": {**table, "rows": [row(r) for r in records]}})
        self._last = (totals, source, shape, records, encoded)
        return encoded


class Aggregates:
    """`compute()`'s document, computed again only once `ttl_s` has passed on `clock`."""

    def __init__(
        self,
        compute: Callable[[], dict[str, Any]],
        ttl_s: float = AGGREGATES_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self.ttl_s = ttl_s
        self.clock = clock
        self._doc: dict[str, Any] | None = None
        self._at = 0.0

    def get(self) -> dict[str, Any]:
        """The document, at most `ttl_s` old."""
        now = self.clock()
        if self._doc is None or now - self._at >= self.ttl_s:
            self._doc = self._compute()
            self._at = now
        return self._doc
